"""Probes: frozen-feature MIR evaluation of checkpoints and the nightly probe job."""

"""Cluster: distributed environments, job submission through submitit, run ownership, the status table."""

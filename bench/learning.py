"""Does pretraining on real recorded music learn what MIR probes measure, and does the paper's target ablation
reproduce at this scale?

The tiny model is pretrained for a fixed budget on recorded game soundtracks (Debian's `wesnoth-1.16-music`,
`supertux-data` and `hedgewars-data`, about 5 hours of Ogg Vorbis, installed with apt-get when missing), once per
pretraining seed and per target (the teacher's top half of the layers averaged, as the paper's top 8 of 12, or all
of them, as its top 12). Each run, and the same architecture at its random initialisation, is then probed on the
demo's key, tempo and instrument tasks (tunes rendered from scores the soundtracks do not contain), MARBLE's head
with several head seeds, on the learned layer weights and on each hidden state alone (the layer-wise curve). A
classic key finder (a chroma profile against Krumhansl-Kessler's, no learning) scores the same key test clips;
a classic tempo feature (the onset envelope's periodicity) and log-mel statistics score the same tempo clips.
The spread across pretraining seeds is what decides whether a difference holds.

Prints the probe table, writes `summary.json` (the table, the layer-wise means, the loss and target_var curves)
and `learning.png` (the curves) under --out. Runs, shards and probe data are kept there and reused.

    python bench/learning.py --out runs/learning [--updates 4000] [--seeds 1 2 3] [--targets top_half all]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torchaudio

from data import ShardParams, write_shards
from data.audio import SAMPLE_RATE, decode_file
from probes.datasets import demo as demo_tasks
from probes.features import normalised_windows
from probes.metrics import key_weighted_score
from probes.nightly import nightly, read_results
from probes.probe import ProbeSettings
from probes.tasks import Example
from trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SOUNDTRACKS = {  # Debian package -> its music folder (the packages hold sound effects and voices too)
    "wesnoth-1.16-music": "/usr/share/games/wesnoth/1.16/data/core/music",
    "supertux-data": "/usr/share/games/supertux2/music",
    "hedgewars-data": "/usr/share/games/hedgewars/Data/Music",
}
TINY_LAYERS = 4
TARGETS = {"top_half": TINY_LAYERS // 2, "all": TINY_LAYERS}  # teacher layers averaged into the target
# Krumhansl-Kessler key profiles, C major and C minor.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def soundtrack_files() -> list[str]:
    """Every Ogg Vorbis file of the three packages, installing those that are missing (as root)."""
    missing = [package for package, folder in SOUNDTRACKS.items() if not Path(folder).is_dir()]
    if missing:
        if shutil.which("apt-get") is None:
            sys.exit(f"the soundtracks come from Debian packages {missing}; install them, then run this again")
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True)
    return sorted(str(path) for folder in SOUNDTRACKS.values() for path in Path(folder).rglob("*.ogg"))


def ensure_shards(out: Path) -> Path:
    manifest = out / "shards" / "manifest.json"
    if not manifest.is_file():
        files = soundtrack_files()
        print(f"sharding {len(files)} soundtrack files into {manifest.parent} ...", flush=True)
        write_shards(files, manifest.parent, ShardParams(max_count=64), jobs=2)
    return manifest


def pretrain(manifest: Path, run_dir: Path, *, seed: int, target: str, updates: int) -> None:
    """`music2vec train configs/tiny.yaml` in its own process (a finished run is left as it is)."""
    overrides = [
        f"data.shards={manifest}",
        f"train.run_dir={run_dir}",
        f"optim.max_updates={updates}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        f"model.average_top_k_layers={TARGETS[target]}",
        f"train.checkpoint_every={updates}",
        "train.keep_last=1",
        "train.log_every=50",
    ]
    if (run_dir / "checkpoints" / f"step_{updates:09d}" / "COMPLETE").is_file():
        return
    print(f"pretraining {run_dir.name}: {updates} updates ...", flush=True)
    command = [str(Path(sys.executable).parent / "music2vec"), "train", str(ROOT / "configs" / "tiny.yaml")]
    subprocess.run([*command, *overrides], check=True, stdout=subprocess.DEVNULL)


def probe_run(run_dir: Path, out: Path, head_seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """The demo tasks on the run's last checkpoint and its random init: learned layer weights, then every layer."""
    for layers in (None, "all"):
        settings = ProbeSettings(
            data_root=out / "probe_data",
            seeds=head_seeds,
            cache=out / "feature_cache",
            progress=False,
            random_init=True,
            layers=layers,
        )
        nightly(run_dir, list(demo_tasks.TASKS), settings)
    return read_results(run_dir)


def chroma_key_baseline(data_root: Path) -> float:
    """Krumhansl-Schmuckler on the demo_key test clips: the key whose rotated profile best matches the chroma."""
    task = demo_tasks.TASKS["demo_key"]
    test = [example for example in demo_tasks.examples(task, data_root) if example.split == "test"]
    guesses = [_estimate_key(decode_file(str(example.path)).audio) for example in test]
    return key_weighted_score(task, np.array(guesses), np.array([example.target for example in test]))


def _estimate_key(audio: np.ndarray) -> int:
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / SAMPLE_RATE)
    audible = (freqs > 60) & (freqs < 2000)
    pitch_class = np.round(12 * np.log2(freqs[audible] / 440.0) + 69).astype(int) % 12
    chroma = np.bincount(pitch_class, weights=power[audible], minlength=12)
    fits = [np.corrcoef(np.roll(profile, tonic), chroma)[0, 1] for profile in (MAJOR_PROFILE, MINOR_PROFILE)
            for tonic in range(12)]  # fmt: skip
    return int(np.argmax(fits))  # the demo's KEYS: the 12 major keys from C, then the 12 minor ones


def tempo_baselines(data_root: Path) -> dict[str, dict[str, float]]:
    """Tempo from classic features, no pretraining, fit on the demo_tempo training clips: the periodicity of the
    onset envelope (a tempo feature; random forest), and each log-mel band's mean and deviation over the clip (what
    a pooled representation could hold; ridge regression). R^2 on the test clips: all of them, and those with and
    without drums (whose beat is then left to the notes)."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score

    examples = demo_tasks.examples(demo_tasks.TASKS["demo_tempo"], data_root)
    train, test = _tempo_clips(examples, "train"), _tempo_clips(examples, "test")
    regressors = {
        "onset_periodicity": (_beat_periodicity, RandomForestRegressor(n_estimators=300, random_state=0)),
        "log_mel_statistics": (_log_mel_statistics, RidgeCV(alphas=np.logspace(-3, 4, 15))),
    }
    scores = {}
    for name, (feature, regressor) in regressors.items():
        regressor.fit(np.stack([feature(audio) for audio in train.audio]), train.tempo)
        predicted = regressor.predict(np.stack([feature(audio) for audio in test.audio]))
        scores[name] = {
            "all": float(r2_score(test.tempo, predicted)),
            "drums": float(r2_score(test.tempo[test.drums], predicted[test.drums])),
            "no_drums": float(r2_score(test.tempo[~test.drums], predicted[~test.drums])),
        }
    return scores


@dataclass(frozen=True)
class _TempoClips:
    audio: list[np.ndarray]  # normalised as the probes normalise a file
    tempo: np.ndarray
    drums: np.ndarray  # whether each clip has drums (its sidecar labels say)


def _tempo_clips(examples: list[Example], split: str) -> _TempoClips:
    chosen = [example for example in examples if example.split == split]
    labels = [json.loads(example.path.with_suffix(".json").read_text()) for example in chosen]
    return _TempoClips(
        audio=[normalised_windows(decode_file(str(example.path)).audio, 0.0, "file", None)[0] for example in chosen],
        tempo=np.array([example.target[0] for example in chosen]),
        drums=np.array(["drums" in clip["instruments"] for clip in labels]),
    )


def _beat_periodicity(audio: np.ndarray) -> np.ndarray:
    spectrum = np.log1p(100 * _magnitudes(audio))
    flux = np.maximum(np.diff(spectrum, axis=0), 0).sum(axis=1)  # how much new energy each 10 ms brings
    flux -= flux.mean()
    autocorrelation = np.correlate(flux, flux, "full")[flux.size - 1 :]
    return autocorrelation[20:200] / (autocorrelation[0] + 1e-9)  # lags of 0.2 to 2 s: 300 to 30 beats per minute


def _log_mel_statistics(audio: np.ndarray, bands: int = 64) -> np.ndarray:
    spectrum = _magnitudes(audio)
    mel = torchaudio.functional.melscale_fbanks(spectrum.shape[1], 0.0, SAMPLE_RATE / 2, bands, SAMPLE_RATE)
    log_mel = np.log(spectrum**2 @ mel.numpy() + 1e-6)  # (frames, bands)
    return np.concatenate([log_mel.mean(axis=0), log_mel.std(axis=0)])


def _magnitudes(audio: np.ndarray, size: int = 1024, hop: int = SAMPLE_RATE // 100) -> np.ndarray:
    """The magnitude spectrum of Hann-windowed frames every 10 ms: (frames, size // 2 + 1)."""
    frames = np.lib.stride_tricks.sliding_window_view(audio, size)[::hop] * np.hanning(size)
    return np.abs(np.fft.rfft(frames, axis=1))


def primary(rows: list[dict[str, Any]], task: str, *, step: int, layer: int | None) -> list[float]:
    return [
        row["value"]
        for row in rows
        if row["task"] == task and row["primary"] and row["step"] == step and row["head"].get("layer") == layer
    ]


def summarise(runs: dict[str, Path], updates: int) -> dict[str, Any]:
    """Per run: the primary metric of every task (mean over head seeds) pretrained and at random init, per layer
    too, and the loss and target_var curves."""
    summary: dict[str, Any] = {}
    for name, run_dir in runs.items():
        rows = read_results(run_dir)
        metrics = read_metrics(run_dir)
        layers = sorted({row["head"]["layer"] for row in rows if row["head"].get("layer") is not None})
        summary[name] = {
            task: {
                "pretrained": statistics.mean(primary(rows, task, step=updates, layer=None)),
                "random_init": statistics.mean(primary(rows, task, step=0, layer=None)),
                "head_seed_spread": statistics.pstdev(primary(rows, task, step=updates, layer=None)),
                "by_layer": {
                    layer: statistics.mean(primary(rows, task, step=updates, layer=layer)) for layer in layers
                },
                "random_init_by_layer": {
                    layer: statistics.mean(primary(rows, task, step=0, layer=layer)) for layer in layers
                },
            }
            for task in demo_tasks.TASKS
        } | {
            "curves": {
                "step": [row["step"] for row in metrics],
                "loss": [row["loss"] for row in metrics],
                "target_var": [row["target_var"] for row in metrics],
            }
        }
    return summary


def print_table(summary: dict[str, Any], key_baseline: float, tempo: dict[str, dict[str, float]]) -> None:
    print(f"\n{'run':<22}" + "".join(f"{task:>32}" for task in demo_tasks.TASKS))
    for name, result in summary.items():
        cells = "".join(
            f"{result[task]['pretrained']:>17.3f} (random {result[task]['random_init']:.3f})"
            for task in demo_tasks.TASKS
        )
        print(f"{name:<22}{cells}")
    print(f"chroma key finder (Krumhansl-Kessler) on the same key test clips: {key_baseline:.3f} weighted score")
    for name, scores in tempo.items():
        cells = ", ".join(f"{value:.3f} ({clips})" for clips, value in scores.items())
        print(f"{name.replace('_', ' ')} on the same tempo test clips: R^2 {cells}")
    for task in demo_tasks.TASKS:
        for name, result in summary.items():
            for curve_name, label in (("by_layer", "by layer"), ("random_init_by_layer", "random init")):
                curve = ", ".join(f"{layer}: {value:.3f}" for layer, value in result[task][curve_name].items())
                print(f"  {task:<18} {name:<22} {label:<12} {curve}")


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, result in summary.items():
        curves = result["curves"]
        for axis, metric in zip(axes, ("loss", "target_var"), strict=True):
            axis.plot(curves["step"], curves[metric], label=name)
            axis.set_title(metric)
            axis.set_xlabel("update")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/learning")
    parser.add_argument("--updates", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="pretraining seeds")
    parser.add_argument("--head-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=["top_half", "all"])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = ensure_shards(out)
    demo_tasks.prepare(out / "probe_data")
    runs = {}
    for target in args.targets:
        for seed in args.seeds:
            run_dir = out / "runs" / f"{target}-seed{seed}"
            pretrain(manifest, run_dir, seed=seed, target=target, updates=args.updates)
            probe_run(run_dir, out, tuple(args.head_seeds))
            runs[run_dir.name] = run_dir
    summary = summarise(runs, args.updates)
    key_baseline = chroma_key_baseline(out / "probe_data")
    tempo = tempo_baselines(out / "probe_data")
    print_table(summary, key_baseline, tempo)
    baselines = {"chroma_key": key_baseline, "tempo": tempo}
    (out / "summary.json").write_text(json.dumps({"runs": summary} | baselines, indent=1) + "\n")
    plot_curves(summary, out / "learning.png")
    print(f"\nwrote {out / 'summary.json'} and {out / 'learning.png'}")


if __name__ == "__main__":
    main()

"""What a run reports, on rank 0: TensorBoard scalars, a metrics.jsonl line per update, and a progress bar."""

from __future__ import annotations

import resource
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data import jsonlines
from trainer.layout import METRICS, TENSORBOARD


class MetricsLog:
    """Accumulates per-update values and writes their means every `every` updates; silent on other ranks."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        every: int,
        start: int,
        total: int,
        memory: Callable[[], dict[str, float]] = dict,
    ) -> None:
        self.enabled = rank == 0
        self.every = every
        self.memory = memory  # peak device memory since its last call, logged once per interval
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        if not self.enabled:
            return
        # purge_step drops what a crash left in TensorBoard past `start`
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD), purge_step=start + 1)
        self.jsonl = run_dir / METRICS
        _truncate_after(self.jsonl, start)
        self.total = total
        # A progress bar on a terminal; in a job's log file, one plain line per `every` updates instead.
        self.bar = tqdm(total=total, initial=start, desc="train", unit="update", dynamic_ncols=True, disable=None)

    def update(self, step: int, values: dict[str, float]) -> None:
        """One optimizer update's values; every `every` updates their means go to TensorBoard."""
        if not self.enabled:
            return
        jsonlines.append(self.jsonl, [{"step": step, **values}])
        for name, value in values.items():
            self.sums[name] += value
        self.count += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", audio_s_per_s=f"{values['audio_seconds_per_s']:.0f}")
        if step % self.every == 0:
            self.flush(step)

    def flush(self, step: int) -> None:
        if not self.enabled or not self.count:
            return
        means = {name: total / self.count for name, total in self.sums.items()}
        for name, mean in means.items():
            self.writer.add_scalar(f"train/{name}", mean, step)
        if self.bar.disable:
            print(
                f"update {step}/{self.total}: loss {means['loss']:.4f}, lr {means['lr']:.2e},"
                f" {means['audio_seconds_per_s']:.0f} audio-s/s, {means['step_time']:.3f} s/update",
                flush=True,
            )
        self.writer.add_scalar("system/max_rss_gb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, step)
        for name, value in self.memory().items():
            self.writer.add_scalar(f"system/{name}", value, step)
        self.writer.flush()
        self.sums.clear()
        self.count = 0

    def close(self, step: int) -> None:
        if self.enabled:
            self.flush(step)
            self.writer.close()
            self.bar.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the lines of updates up to `step`: a resumed run rewrites the ones after its checkpoint."""
    if path.is_file():
        jsonlines.rewrite(path, [entry for entry in jsonlines.read(path) if entry.get("step", 0) <= step])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return jsonlines.read(run_dir / METRICS)

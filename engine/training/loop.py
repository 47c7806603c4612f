"""The training loop every task runs through: timed batch fetch, the task's step, a metrics window every
`log_every` steps (means over ranks, img/s, data-loading share), then the task's after-step work (checkpoints)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Protocol

import torch
from tqdm import tqdm

from engine.distributed import DistInfo, all_reduce_mean


class Task(Protocol):
    """What a task supplies. `step` counts the optimizer steps done before (train_step) or after (record,
    after_step) the call."""

    def train_step(self, step: int, batch) -> dict[str, torch.Tensor]:
        """One optimizer step on `batch`; detached scalars to average over the window, "loss" among them."""

    def record(self, step: int, means: dict[str, float]) -> dict[str, float]:
        """What the task adds to a metrics record (lr, epoch, monitors...)."""

    def after_step(self, step: int) -> None:
        """Work after each step, e.g. a checkpoint."""


class MetricsWindow:
    """Per-step values summed since the last record, and where the time went."""

    def __init__(self, dist: DistInfo, images_per_step: int):
        self.dist, self.images_per_step = dist, images_per_step
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.data_time, self.start = 0, 0.0, time.perf_counter()

    def fetch(self, batches: Iterator):
        start = time.perf_counter()
        batch = next(batches)
        self.data_time += time.perf_counter() - start
        return batch

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1

    def close(self) -> dict[str, float]:
        """Means over the window's steps and all ranks, img/s and the data-loading share; starts a new window."""
        stacked = all_reduce_mean(torch.stack(list(self.sums.values())) / self.steps).tolist()  # waits for the steps
        elapsed = time.perf_counter() - self.start
        record = dict(zip(self.sums, stacked))
        record.update(img_per_s=self.steps * self.images_per_step / elapsed, data_time_share=self.data_time / elapsed)
        self._reset()
        return record


def train(task: Task, batches: Iterator, *, dist: DistInfo, start: int, steps: int, log_every: int,
          images_per_step: int, metrics, progress: bool, desc: str) -> dict[str, float]:
    """Run `task` from step `start` to `steps` on `batches`; `metrics.write(step, **record)` every `log_every` steps
    and at the last. Returns the last record."""
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not (dist.is_main and progress), dynamic_ncols=True)
    window, record = MetricsWindow(dist, images_per_step), {}
    for step in range(start, steps):
        batch = window.fetch(batches)
        window.add(task.train_step(step, batch))
        bar.update(1)
        done = step + 1
        if done % log_every == 0 or done == steps:
            record = window.close()
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"{desc}: loss is {record['loss']} at step {done}")
            record.update(task.record(done, record))
            metrics.write(done, **record)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "img_per_s")})
        task.after_step(done)
    bar.close()
    return record

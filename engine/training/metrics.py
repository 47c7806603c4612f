"""Metrics to jsonl and TensorBoard, and PNG plots of them."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path


class MetricsWriter:
    """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl. A line that is not JSON (a write cut short when a run was killed, then
    resumed) is skipped with a warning naming the file and line."""
    records, unreadable = [], []
    with Path(path).open() as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    unreadable.append(number)
    if unreadable:
        warnings.warn(f"{path}: skipped {len(unreadable)} line(s) that are not JSON (line {unreadable[0]} first)",
                      stacklevel=2)
    return records


def run_records(path: str | Path) -> list[dict]:
    """The training records of a metrics.jsonl, one per step in step order: after a resume from an earlier
    checkpoint the steps since it are logged again, and the later record wins."""
    return sorted({r["step"]: r for r in read_metrics(path) if "loss" in r}.values(), key=lambda r: r["step"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png_path: str | Path) -> Path:
    png_path = Path(png_path)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    _pyplot().close(fig)
    return png_path


def uniform_loss(heads: list[int]) -> float:
    """The SwAV loss of uniform predictions, where a collapsed run sits: ln K (the mean over prototype heads, K of
    each in `heads`)."""
    return sum(math.log(k) for k in heads) / len(heads)


def plot_loss(records: list[dict], png_path: str | Path, heads: list[int] | None = None) -> Path:
    """Loss (and lr) of a run's records (run_records) against step, with ln(K) — the loss of uniform predictions,
    i.e. collapse — marked."""
    steps = [r["step"] for r in records]
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="SwAV loss")
    if heads:
        ln_k = uniform_loss(heads)
        ax.axhline(ln_k, color="gray", linestyle="--", label=f"ln K = {ln_k:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    handles = ax.get_lines()
    if records and "lr" in records[0]:
        lr_axis = ax.twinx()
        handles += lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.5, label="lr")
        lr_axis.set_ylabel("learning rate")
    ax.legend(handles=handles, loc="upper right")
    ax.grid(alpha=0.3)
    return _save(fig, png_path)


def plot_series(png_path: str | Path, series: dict[str, tuple[list[float], list[float]]], ylabel: str,
                reference: tuple[float, str] | None = None) -> Path:
    """Named (steps, values) curves on one axis against step; `reference`: a dashed (value, label) line."""
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for label, (steps, values) in series.items():
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=label)
    if reference is not None:
        ax.axhline(reference[0], color="gray", linestyle="--", label=reference[1])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, png_path)

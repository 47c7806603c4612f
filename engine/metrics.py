"""Metrics to jsonl and TensorBoard, and PNG plots of them."""
from __future__ import annotations

import json
import math
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
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str | Path, png_path: str | Path, num_prototypes: int | None = None) -> Path:
    """Loss (and lr) against step, with ln(K) — the loss of uniform predictions, i.e. collapse — marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="SwAV loss")
    if num_prototypes:
        ax.axhline(math.log(num_prototypes), color="gray", linestyle="--", label=f"ln K = {math.log(num_prototypes):.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if records and "lr" in records[0]:
        lr_axis = ax.twinx()
        lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.5, label="lr")
        lr_axis.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path

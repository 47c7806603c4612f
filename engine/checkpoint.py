"""Training checkpoints: DeepSpeed's engine state plus each rank's own trainer state (step, loader, RNG)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def _tag(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    """Saves into `directory/step_XXXXXXXX/` and points DeepSpeed's `latest` file at it.

    The per-rank trainer files are written (atomically) before DeepSpeed's save, and DeepSpeed writes `latest`
    only after its own files, so a tag named by `latest` is always complete.
    """

    def __init__(self, directory: str | Path, rank: int):
        self.directory = Path(directory)
        self.rank = rank

    def latest_step(self) -> int | None:
        latest = self.directory / "latest"
        if not latest.is_file():
            return None
        return int(latest.read_text().strip().removeprefix("step_"))

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        tag_dir = self.directory / _tag(step)
        tag_dir.mkdir(parents=True, exist_ok=True)
        final = tag_dir / f"trainer_rank{self.rank:05d}.pt"
        partial = final.with_suffix(".pt.partial")
        torch.save({"step": step, **trainer_state}, partial)
        os.replace(partial, final)
        if dist.is_initialized():
            dist.barrier()  # every rank's trainer file exists before `latest` can move
        engine.save_checkpoint(str(self.directory), tag=_tag(step))
        return tag_dir

    def load(self, engine) -> dict | None:
        """Restore the engine from the latest checkpoint; return this rank's trainer state (None: nothing saved)."""
        step = self.latest_step()
        if step is None:
            return None
        path = self.directory / _tag(step) / f"trainer_rank{self.rank:05d}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"checkpoint {path.parent} has no trainer state for rank {self.rank}: it was written by a run with "
                f"another number of ranks; resume with the same world size"
            )
        loaded, _ = engine.load_checkpoint(str(self.directory), tag=_tag(step))
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.directory / _tag(step)}")
        return torch.load(path, weights_only=False)

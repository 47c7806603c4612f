"""What the loaders' DALI graphs share: where a graph runs (one rule for every loader), per-rank random streams, and
endless iteration over the epochs of a train graph."""
from __future__ import annotations

import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from dataloading.shards import READER


def dali_device(device: torch.device | str) -> tuple[str, int | None]:
    """Where a loader asked for torch `device` runs its graph: ("cpu", None), or ("cuda", GPU index) with the index
    that `tensor.to(device)` would use: the device's own, else torch's current GPU. The index is None on a machine
    without a GPU: the graph can still be defined and serialized there, and DALI refuses to build it."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"a loader's device must be cpu or cuda, got {str(device)!r}")
    if device.type == "cpu":
        return "cpu", None
    if device.index is not None:
        return "cuda", device.index
    return "cuda", torch.cuda.current_device() if torch.cuda.is_available() else None


def rank_seed(seed: int, shard_id: int) -> int:
    """Different random streams per rank, reproducible for a (seed, rank) pair."""
    return (seed * 10_000 + shard_id) % 2**31


class EpochIterator:
    """Endless iteration over the epochs of a train graph: full batches only, counting epochs, steps and the samples
    the guard replaced (`bad_samples`)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches yielded in total
    bad_samples: int = 0  # samples replaced by a gray image so far (their file names are logged as warnings)

    def __iter__(self):
        return self

    def _start(self, pipe: Pipeline, names: list[str], shard: str) -> None:
        """Iterate `pipe` (outputs `names`); `shard` names this rank's shard in the error when it is too small."""
        self._iterator = DALIGenericIterator(
            pipe, names, reader_name=READER, last_batch_policy=LastBatchPolicy.DROP, auto_reset=True,
            prepare_first_batch=False,
        )
        self.samples_per_epoch = self._iterator.size  # samples of this rank's shard per epoch
        self.steps_per_epoch = len(self._iterator)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {pipe.max_batch_size} exceeds the {self.samples_per_epoch} samples of {shard}")

    def _next_batch(self) -> dict:
        try:
            (batch,) = next(self._iterator)
        except StopIteration:  # end of an epoch; auto_reset has already rewound the iterator
            self.epoch += 1
            (batch,) = next(self._iterator)
        self.step += 1
        if "replaced" in batch:
            self.bad_samples += int(batch["replaced"].sum())
        return batch


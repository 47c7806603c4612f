"""What the loaders' DALI graphs share: where a graph runs (one rule for every loader), per-rank random streams, and
endless iteration over the epochs of a train graph, whose reader `read_train_samples` defines."""
from __future__ import annotations

import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from dataloading.shards import READER, read_samples


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


def read_train_samples(tars, idxs, labelled: bool, *, seed: int, shard_id: int, num_shards: int):
    """The reader op of a train graph (dataloading.shards.read_samples) for rank `shard_id` of `num_shards`.

    Each epoch the samples, with the tar files in an order drawn from `seed` (the same on every rank), are cut into
    num_shards contiguous DALI shards and each rank reads its own (the next one each epoch): the ranks' shards of one
    epoch are disjoint and together hold every sample. The shuffle buffer mixes samples within the rank's shard.
    pad_last_batch: the reader ends each epoch on a batch boundary, padding its last batch with copies of the last
    sample instead of filling it from the next epoch, so no batch mixes two epochs; EpochIterator drops that batch.
    """
    return read_samples(
        tars, idxs, labelled, random_shuffle=True, shuffle_after_epoch=True, shuffle_after_epoch_seed=seed,
        pad_last_batch=True, shard_id=shard_id, num_shards=num_shards,
    )


class EpochIterator:
    """Endless iteration over the epochs of a train graph read by `read_train_samples`: full batches only, counting
    epochs, steps and the samples the guard replaced (`bad_samples`).

    Every rank yields steps_per_epoch = samples_per_epoch // batch_size full batches per epoch (samples_per_epoch:
    the smallest rank's shard), each sample of its shard at most once, then drops the rest of its shard: at most
    batch_size samples per rank and epoch. Dropped as SwAV and SEER do (drop_last), not padded: every batch is a
    full batch of distinct samples of one epoch, for the batch norms and the equal-partition codes, and every rank
    runs the same number of steps per epoch, so the ranks' epochs end together.
    """

    epoch: int = 0  # epochs completed
    step: int = 0  # batches yielded in total
    bad_samples: int = 0  # samples replaced by a gray image so far (their file names are logged as warnings)

    def __iter__(self):
        return self

    def _start(self, pipe: Pipeline, names: list[str], shard: str) -> None:
        """Iterate `pipe` (outputs `names`); `shard` names this rank's shard in the error when it is too small."""
        # FILL, and _next_batch drops the padded batch itself: DALI's DROP policy leaves a batch of padding only in
        # the pipeline (ranks of 171 and 172 samples, batch 19), which would open the next epoch.
        self._iterator = DALIGenericIterator(
            pipe, names, reader_name=READER, last_batch_policy=LastBatchPolicy.FILL, auto_reset=True,
            prepare_first_batch=False,
        )
        meta = pipe.reader_meta(READER)
        self.samples_per_epoch = meta["epoch_size"] // meta["number_of_shards"]  # in the smallest shard of a rank
        self.steps_per_epoch = self.samples_per_epoch // pipe.max_batch_size
        self._epoch_step = 0  # batches yielded of the current epoch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {pipe.max_batch_size} exceeds the {self.samples_per_epoch} samples of {shard}")

    def _next_batch(self) -> dict:
        if self._epoch_step == self.steps_per_epoch:
            try:  # the epoch's last, padded batch if any; then auto_reset rewinds the iterator and raises
                while True:
                    next(self._iterator)
            except StopIteration:
                self.epoch += 1
                self._epoch_step = 0
        (batch,) = next(self._iterator)
        self.step += 1
        self._epoch_step += 1
        if "replaced" in batch:
            self.bad_samples += int(batch["replaced"].sum())
        return batch

"""DALI supervised train loader over packed labelled shards: random-resized crop, horizontal flip, normalize.

The standard supervised augmentation used for fine-tuning. Like the multi-crop TrainLoader it is sharded by rank
(every sample once per epoch across ranks), reproducible for a seed, and runs on CPU (device="cpu") or as a GPU
graph ("mixed" decode, device="cuda"). The test split is read with dataloading.pipeline.build_eval_loader.
"""
from __future__ import annotations

import torch
from nvidia.dali import fn
from nvidia.dali.pipeline import Pipeline

from dataloading.pipeline import (
    ASPECT_RATIO,
    EpochIterator,
    _ascii_to_int,
    _check_channels,
    _check_device,
    _decode,
    _device_id,
    _guarded,
    _meta_outputs,
    _normalize,
    _rank_seed,
    _read_samples,
    class_names,
    read_manifest,
)


def define_supervised_pipeline(
    shards_dir, *, size: int, scale: tuple[float, float], channels: int, mean, std, batch_size: int,
    flip_p: float = 0.5, num_threads: int = 2, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
    device: str = "cpu", device_id: int | None = None, with_index: bool = False, guard: bool | None = None,
) -> tuple[Pipeline, list[str]]:
    """The supervised train graph (not built) and the names of its outputs: "image", "label" (, "replaced", "index").

    guard: check and replace bad samples (dataloading.pipeline's guard); None: unless pack checked them
    (needs_guard); False also to serialize the graph.
    """
    _check_device(device)
    _check_channels(channels, mean, std)
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
    manifest, tars, idxs = read_manifest(shards_dir)
    class_names(manifest, shards_dir, "the supervised loader's shards")  # labels are what it trains on
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    seed=_rank_seed(seed, shard_id))
    with pipe:
        jpegs, labels = _read_samples(
            tars, idxs, True, random_shuffle=True,
            # As the multi-crop loader: one tar order per epoch shared by all ranks keeps their shards disjoint.
            shuffle_after_epoch=True, shuffle_after_epoch_seed=seed, shard_id=shard_id, num_shards=num_shards,
        )
        encoded, flags, flag_names = _guarded(jpegs, manifest, guard)
        crop = fn.random_resized_crop(_decode(encoded, channels, device), size=[size, size], random_area=list(scale),
                                      random_aspect_ratio=list(ASPECT_RATIO))
        mirror = fn.random.coin_flip(probability=flip_p) if flip_p > 0 else None
        meta, meta_names = _meta_outputs(labels, jpegs, with_index, device)
        pipe.set_outputs(_normalize(crop, mean, std, mirror), *flags, *meta)
    return pipe, ["image"] + flag_names + meta_names


class SupervisedLoader(EpochIterator):
    """Endless iterator of {"image": B×C×size×size float, "label": int64 (B,)} (+ "index" with with_index).

    Each epoch yields floor(samples_per_epoch / batch_size) full batches of this rank's shard, then the next epoch
    starts in a new order.
    """

    def __init__(self, pipe: Pipeline, names: list[str], with_index: bool):
        self.with_index = with_index
        self._start(pipe, names, "this rank's shard")

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._next_batch()
        out = {"image": batch["image"], "label": _ascii_to_int(batch["label"])}
        if self.with_index:
            out["index"] = _ascii_to_int(batch["index"])
        return out


def build_supervised_loader(
    shards_dir, *, size: int, scale: tuple[float, float], channels: int, mean, std, batch_size: int,
    flip_p: float = 0.5, num_threads: int = 2, seed: int = 0, shard_id: int = 0, num_shards: int = 1,
    device: str = "cpu", device_id: int | None = None, with_index: bool = False,
) -> SupervisedLoader:
    """Supervised loader over the labelled shards in `shards_dir` for rank `shard_id` of `num_shards`.

    Crops cover a `scale` fraction of the image area (aspect 3/4-4/3) and are resized to size×size; flipped with
    probability flip_p. device="cuda" runs the graph on GPU `device_id` (default: $LOCAL_RANK, else 0).
    with_index adds "index": the packed sample key (int64), for checks of sharding and coverage.
    """
    pipe, names = define_supervised_pipeline(
        shards_dir, size=size, scale=scale, channels=channels, mean=mean, std=std, batch_size=batch_size,
        flip_p=flip_p, num_threads=num_threads, seed=seed, shard_id=shard_id, num_shards=num_shards, device=device,
        device_id=_device_id(device, device_id), with_index=with_index,
    )
    return SupervisedLoader(pipe, names, with_index)

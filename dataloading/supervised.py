"""DALI supervised train loader over packed labelled shards: random-resized crop, horizontal flip, normalize.

The standard supervised augmentation used for fine-tuning. Like the multi-crop TrainLoader it is sharded by rank
(each sample at most once per epoch across ranks, see dataloading.graph.EpochIterator), reproducible for a seed,
and runs on CPU (device="cpu") or as a GPU graph ("mixed" decode, device="cuda"). The test split is read with
dataloading.eval.build_eval_loader.
"""
from __future__ import annotations

import os

import torch
from nvidia.dali.pipeline import Pipeline

from dataloading.augment import decode, normalize, random_flip, random_resized_crop
from dataloading.config import DataConfig, check_data_config
from dataloading.graph import EpochIterator, dali_device, rank_seed, read_train_samples
from dataloading.shards import (
    ascii_to_int,
    class_names,
    guard_samples,
    label_and_index_outputs,
    read_manifest,
)


def define_supervised_pipeline(
    cfg: DataConfig, shards_dir: str | os.PathLike, *, size: int, scale: tuple[float, float], batch_size: int,
    flip_p: float = 0.5, seed: int = 0, shard_id: int = 0, num_shards: int = 1, device: torch.device | str = "cpu",
    with_index: bool = False, guard: bool | None = None,
) -> tuple[Pipeline, list[str]]:
    """The supervised train graph (not built) and the names of its outputs: "image", "label" (, "replaced", "index").
    Images are decoded with cfg.channels and normalized with cfg.mean and cfg.std, on cfg.num_threads threads.

    device: where the graph runs (see dataloading.graph.dali_device).
    guard: check and replace bad samples (dataloading.shards.guard_samples); None: unless pack checked them
    (needs_guard); False also to serialize the graph.
    """
    device_type, device_id = dali_device(device)
    check_data_config(cfg)
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")
    manifest, tars, idxs = read_manifest(shards_dir)
    class_names(manifest, shards_dir, "the supervised loader's shards")  # labels are what it trains on
    pipe = Pipeline(batch_size=batch_size, num_threads=cfg.num_threads, device_id=device_id,
                    seed=rank_seed(seed, shard_id))
    with pipe:
        jpegs, labels = read_train_samples(tars, idxs, True, seed=seed, shard_id=shard_id, num_shards=num_shards)
        encoded, flags, flag_names = guard_samples(jpegs, manifest, guard)
        crop = random_resized_crop(decode(encoded, cfg.channels, device_type), size, scale)
        mirror = random_flip(flip_p)
        meta, meta_names = label_and_index_outputs(labels, jpegs, with_index, device_type)
        pipe.set_outputs(normalize(crop, cfg.mean, cfg.std, mirror), *flags, *meta)
    return pipe, ["image"] + flag_names + meta_names


class SupervisedLoader(EpochIterator):
    """Endless iterator of {"image": B×C×size×size float, "label": int64 (B,)} (+ "index" with with_index).

    Each epoch yields steps_per_epoch full batches of this rank's shard, disjoint from the other ranks' (see
    EpochIterator), then the next epoch starts in a new order.
    """

    def __init__(self, pipe: Pipeline, names: list[str], with_index: bool):
        self.with_index = with_index
        self._start(pipe, names, "this rank's shard")

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._next_batch()
        out = {"image": batch["image"], "label": ascii_to_int(batch["label"])}
        if self.with_index:
            out["index"] = ascii_to_int(batch["index"])
        return out


def build_supervised_loader(
    cfg: DataConfig, shards_dir: str | os.PathLike, *, size: int, scale: tuple[float, float], batch_size: int,
    flip_p: float = 0.5, seed: int = 0, shard_id: int = 0, num_shards: int = 1, device: torch.device | str = "cpu",
    with_index: bool = False,
) -> SupervisedLoader:
    """Supervised loader over the labelled shards in `shards_dir` for rank `shard_id` of `num_shards`, preprocessed
    with cfg's channels, mean and std.

    Crops cover a `scale` fraction of the image area (aspect 3/4-4/3) and are resized to size×size; flipped with
    probability flip_p. seed: the loader's random streams (the fine-tuning run's seed, not cfg.seed).
    with_index adds "index": the packed sample key (int64), for checks of sharding and coverage.
    """
    pipe, names = define_supervised_pipeline(
        cfg, shards_dir, size=size, scale=scale, batch_size=batch_size, flip_p=flip_p, seed=seed, shard_id=shard_id,
        num_shards=num_shards, device=device, with_index=with_index,
    )
    return SupervisedLoader(pipe, names, with_index)

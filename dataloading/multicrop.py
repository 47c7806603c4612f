"""The multi-crop SwAV/SEER train loader: every sample decoded once, then each crop of cfg.crops cut from it and
augmented independently (dataloading.augment), on the CPU (device="cpu": CPU tensors) or a GPU (device="cuda":
"mixed" decode, GPU ops, CUDA tensors). The graph is defined by `define_train_pipeline` without building or running
it, so a GPU graph can be checked (`pipe.serialize()`, with guard=False) on a machine without one.
"""
from __future__ import annotations

import warnings

import torch
from nvidia.dali.pipeline import Pipeline

from dataloading.augment import blur, decode, jitter_colors, normalize, random_flip, random_resized_crop, solarize
from dataloading.config import CropGroup, DataConfig, check_data_config
from dataloading.graph import EpochIterator, dali_device, rank_seed, read_train_samples
from dataloading.shards import (
    ascii_to_int,
    batch_labels,
    guard_samples,
    label_and_index_outputs,
    read_manifest,
)


def _crop(image, group: CropGroup, cfg: DataConfig, layout: str):
    """One augmented crop of `group`: random-resized crop, colour jitter and grayscale, blur, solarize, flip,
    normalize."""
    aug = cfg.augment
    crop = random_resized_crop(image, group.size, group.scale)
    crop = jitter_colors(crop, aug, cfg.channels)
    crop = blur(crop, aug.blur_p if group.blur_p is None else group.blur_p, aug.blur_sigma)
    crop = solarize(crop, aug.solarize_p if group.solarize_p is None else group.solarize_p, aug.solarize_threshold)
    mirror = random_flip(aug.flip_p)
    return normalize(crop, cfg.mean, cfg.std, mirror, layout)


def define_train_pipeline(
    cfg: DataConfig,
    *,
    batch_size: int,
    shard_id: int = 0,
    num_shards: int = 1,
    device: torch.device | str = "cpu",
    with_index: bool = False,
    channels_last: bool = True,
    guard: bool | None = None,
    checkpoint: bytes | None = None,
) -> tuple[Pipeline, list[str]]:
    """The multi-crop train graph (not built) and the names of its outputs.

    device: where the graph runs (see dataloading.graph.dali_device).
    channels_last: crops leave DALI as HWC (TrainLoader views them as NCHW tensors in channels_last memory).
    guard: check and replace bad samples (adds the "replaced" output); None: unless pack checked them
    (needs_guard); False also to serialize the graph.
    """
    device_type, device_id = dali_device(device)
    check_data_config(cfg)
    manifest, tars, idxs = read_manifest(cfg.train_shards)
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=cfg.num_threads,
        device_id=device_id,
        seed=rank_seed(cfg.seed, shard_id),
        enable_checkpointing=True,
        checkpoint=checkpoint,
    )
    with pipe:
        jpegs, labels = read_train_samples(tars, idxs, manifest["classes"] is not None, seed=cfg.seed,
                                           shard_id=shard_id, num_shards=num_shards)
        encoded, flags, flag_names = guard_samples(jpegs, manifest, guard)
        image = decode(encoded, cfg.channels, device_type)  # once; every crop is cut from this decoded image
        layout = "HWC" if channels_last else "CHW"
        crops = [_crop(image, group, cfg, layout) for group in cfg.crops for _ in range(group.count)]
        meta, meta_names = label_and_index_outputs(labels, jpegs, with_index, device_type)
        pipe.set_outputs(*crops, *flags, *meta)
    return pipe, [f"crop{i}" for i in range(len(crops))] + flag_names + meta_names


class TrainLoader(EpochIterator):
    """Endless iterator of multi-crop batches: {"crops": [B×C×size×size per crop], "label": int64 (B,)}.

    Crops are crop-major (group 0 copy 0, group 0 copy 1, ..., group 1 copy 0, ...), in cfg.output_dtype, on the
    loader's device, in channels_last memory when asked; label is -1 for unlabelled shards. Each epoch yields
    steps_per_epoch full batches of this rank's shard, disjoint from the other ranks' (see EpochIterator), then the
    next epoch starts. Bad samples are replaced by a gray image and counted in `bad_samples`.
    Resume: DALI's own checkpointing (reader position, shuffle state and every random generator), see state_dict.
    """

    def __init__(self, cfg: DataConfig, *, batch_size, shard_id=0, num_shards=1, device="cpu", with_index=False,
                 channels_last=True, guard=None):
        self.cfg, self.batch_size, self.shard_id, self.num_shards = cfg, batch_size, shard_id, num_shards
        self.device, self.with_index = device, with_index
        self.channels_last, self.dtype, self.guard = channels_last, getattr(torch, cfg.output_dtype), guard
        self.crop_sizes = [group.size for group in cfg.crops for _ in range(group.count)]
        self._build(checkpoint=None)

    def _build(self, checkpoint: bytes | None) -> None:
        pipe, self._names = define_train_pipeline(
            self.cfg, batch_size=self.batch_size, shard_id=self.shard_id, num_shards=self.num_shards,
            device=self.device, with_index=self.with_index,
            channels_last=self.channels_last, guard=self.guard, checkpoint=checkpoint,
        )
        self._start(pipe, self._names, f"shard {self.shard_id}/{self.num_shards} in {self.cfg.train_shards}")

    def __next__(self) -> dict:
        batch = self._next_batch()
        crops = [self._model_input(batch[f"crop{i}"]) for i in range(len(self.crop_sizes))]
        out = {"crops": crops, "label": batch_labels(batch, crops[0])}
        if self.with_index:
            out["index"] = ascii_to_int(batch["index"])
        return out

    def _model_input(self, crop: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            crop = crop.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: torch's channels_last layout, no copy
        return crop if crop.dtype == self.dtype else crop.to(self.dtype)  # DALI has no bf16 output

    def state_dict(self) -> dict:
        """Position after the batches yielded so far. The DALI checkpoint is bytes: save with torch.save/pickle."""
        return {
            "dali_checkpoint": self._iterator.checkpoints()[0],
            "epoch": self.epoch,
            "epoch_step": self._epoch_step,
            "step": self.step,
            "bad_samples": self.bad_samples,
            "seed": self.cfg.seed,
            "shard_id": self.shard_id,
            "num_shards": self.num_shards,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that produced `state` was (same config, rank and world size)."""
        for key in ("seed", "shard_id", "num_shards", "batch_size"):
            mine = self.cfg.seed if key == "seed" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]} but this loader has {key}={mine}; "
                    "a DALI checkpoint only resumes the same rank layout, seed and batch size"
                )
        # A state without epoch_step comes from a reader without pad_last_batch, whose epochs ran into each other:
        # this graph cannot replay its position, so the loader starts a new pass (as at another world size).
        replayable = "epoch_step" in state
        if not replayable:
            warnings.warn(f"loader state of shard {self.shard_id}/{self.num_shards} predates batch-aligned epochs: "
                          f"the loader starts a new pass at epoch {state['epoch']}", stacklevel=2)
        del self._iterator  # release the old pipeline's threads and buffers before building the new one
        self._build(checkpoint=state["dali_checkpoint"] if replayable else None)
        self.epoch, self.step = state["epoch"], state["step"]
        self._epoch_step = state["epoch_step"] if replayable else 0
        self.bad_samples = state.get("bad_samples", 0)  # states saved before the guard existed count from 0


def build_train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    shard_id: int = 0,
    num_shards: int = 1,
    device: torch.device | str = "cpu",
    with_index: bool = False,
    channels_last: bool = True,
    guard: bool | None = None,
) -> TrainLoader:
    """Multi-crop loader over the shards in cfg.train_shards for rank `shard_id` of `num_shards`.

    device: "cpu", or a GPU ("cuda", "cuda:1", a torch.device; see dataloading.graph.dali_device). with_index adds
    "index": the packed sample key (int64), for checks of sharding and coverage. channels_last gives crops in
    torch.channels_last memory (what the model wants with model.channels_last); else contiguous NCHW.
    guard: check every sample before decoding (None: unless `seer data pack` wrote the shards, see needs_guard).
    """
    return TrainLoader(cfg, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards, device=device,
                       with_index=with_index, channels_last=channels_last, guard=guard)



"""The eval loader over packed shards (every sample once, in stored order, resized and normalized) and the same
preprocessing for image files (`seer predict`)."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from dataloading.augment import decode, normalize
from dataloading.config import DataConfig, check_data_config
from dataloading.graph import dali_device
from dataloading.pack import prepare_file
from dataloading.shards import (
    READER,
    ascii_to_int,
    batch_labels,
    guard_samples,
    label_and_index_outputs,
    read_manifest,
    read_samples,
)


def define_eval_pipeline(
    cfg: DataConfig, shards_dir: str | os.PathLike, *, size: int, batch_size: int, shard_id: int = 0,
    num_shards: int = 1, device: torch.device | str = "cpu", with_index: bool = False, guard: bool | None = None,
) -> tuple[Pipeline, list[str]]:
    """The eval graph (not built): every sample of `shards_dir` once, in stored order, decoded with cfg.channels,
    resized to size×size, normalized with cfg.mean and cfg.std, on cfg.num_threads threads.

    device: where the graph runs (see dataloading.graph.dali_device).
    guard: check and replace bad samples (adds the "replaced" output); None: unless pack checked them
    (needs_guard); False also to serialize the graph.
    """
    device_type, device_id = dali_device(device)
    check_data_config(cfg)
    manifest, tars, idxs = read_manifest(shards_dir)
    pipe = Pipeline(batch_size=batch_size, num_threads=cfg.num_threads, device_id=device_id, seed=0)
    with pipe:
        jpegs, labels = read_samples(
            tars, idxs, manifest["classes"] is not None, random_shuffle=False,
            # pad_last_batch lets the iterator tell padding from data (it drops the padding);
            # stick_to_shard keeps every pass on the same samples.
            pad_last_batch=True, stick_to_shard=True, shard_id=shard_id, num_shards=num_shards,
        )
        encoded, flags, flag_names = guard_samples(jpegs, manifest, guard)
        image = fn.resize(decode(encoded, cfg.channels, device_type), size=[size, size])
        meta, meta_names = label_and_index_outputs(labels, jpegs, with_index, device_type)
        pipe.set_outputs(normalize(image, cfg.mean, cfg.std), *flags, *meta)
    return pipe, ["image"] + flag_names + meta_names


class EvalLoader:
    """Re-iterable: each `for` is one pass yielding {"image": B×C×size×size, "label": int64 (B,)}; every sample of
    this rank's shard exactly once (`samples` of them), the last batch possibly smaller. Bad samples are replaced by
    a gray image and counted in `bad_samples` (over all passes)."""

    def __init__(self, pipe: Pipeline, names: list[str], with_index: bool):
        self._iterator = DALIGenericIterator(
            pipe, names, reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True,
            prepare_first_batch=False,
        )
        self.with_index = with_index
        meta = pipe.reader_meta(READER)
        size, shards, shard = meta["epoch_size"], meta["number_of_shards"], meta["shard_id"]
        self.samples = size * (shard + 1) // shards - size * shard // shards  # DALI's shard bounds
        self._batch_size = pipe.max_batch_size
        self.bad_samples = 0
        self._mid_pass = False

    def __len__(self) -> int:
        return math.ceil(self.samples / self._batch_size)

    def __iter__(self):
        if self._mid_pass:  # an earlier pass stopped early; DALI only rewinds at the end of a pass
            for _ in self._iterator:
                pass
        self._mid_pass = True
        for (batch,) in self._iterator:
            if len(batch["image"]) == 0:
                # Padding only: pad_last_batch pads every shard to the largest one's size, then to a whole batch,
                # so a shard one sample smaller can end with a batch that holds none of its samples.
                continue
            if "replaced" in batch:
                self.bad_samples += int(batch["replaced"].sum())
            out = {"image": batch["image"], "label": batch_labels(batch, batch["image"])}
            if self.with_index:
                out["index"] = ascii_to_int(batch["index"])
            yield out
        self._mid_pass = False


def build_eval_loader(
    cfg: DataConfig, shards_dir: str | os.PathLike, *, size: int, batch_size: int, shard_id: int = 0,
    num_shards: int = 1, device: torch.device | str = "cpu", with_index: bool = False,
) -> EvalLoader:
    """Eval loader over `shards_dir` for rank `shard_id` of `num_shards`, preprocessed with cfg's channels, mean and
    std (define_eval_pipeline). with_index adds "index": the packed sample key (int64)."""
    pipe, names = define_eval_pipeline(cfg, shards_dir, size=size, batch_size=batch_size, shard_id=shard_id,
                                       num_shards=num_shards, device=device, with_index=with_index)
    return EvalLoader(pipe, names, with_index)


def image_file_batches(paths, cfg: DataConfig, *, size: int, batch_size: int = 64, jpeg_quality: int = 95):
    """Image files -> float batches B×C×size×size (CPU), in the order given, preprocessed as `seer data pack`
    then the eval loader would (cfg's channels, mean, std and num_threads): each file is decoded by Pillow to
    validate it and, unless it is already a plain JPEG, re-encoded at `jpeg_quality` (pack's default) exactly as
    pack stores it; DALI then decodes, resizes and normalizes with the eval graph's ops. A file Pillow cannot
    decode is a ValueError naming it."""
    check_data_config(cfg)
    pipe = Pipeline(batch_size=batch_size, num_threads=cfg.num_threads, device_id=None, seed=0,
                    prefetch_queue_depth=1)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        image = fn.resize(decode(encoded, cfg.channels, "cpu"), size=[size, size])
        pipe.set_outputs(normalize(image, cfg.mean, cfg.std))
    pipe.build()
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            data, reason, _ = prepare_file(str(path), jpeg_quality, None)
            if data is None:
                raise ValueError(f"{path} is not a usable image file: {reason.replace('_', ' ')}")
            batch.append(np.frombuffer(data, dtype=np.uint8))
        pipe.feed_input("encoded", batch)
        (images,) = pipe.run()
        yield torch.from_numpy(np.array(images.as_tensor()))

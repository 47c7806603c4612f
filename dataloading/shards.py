"""The packed shard format as the DALI graphs read it: manifest, class names, the reader op, label and key outputs,
and the bad-sample guard.

Bad samples: DALI's decoder cannot skip a broken file. A truncated JPEG raises, non-image bytes or a garbled
header can crash the process (seen: segfaults at batch 32). `pack` validates every image it writes, but shards from
other tools are not validated; so the loaders check each sample's bytes before decoding (`jpeg_problem`, a walk over
the segment headers) and replace a bad sample by a gray image, log its file name and count it (`bad_samples`).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, types
from PIL import Image

from dataloading.jpeg import JPEG_CHECK, jpeg_problem
from dataloading.pack import KEY_DIGITS, MANIFEST

READER = "reader"  # the name of every graph's reader op, which the iterators ask for the epoch size
LABEL_WIDTH = 9  # .cls entries hold an ASCII class index; padded to fixed width so a batch is one dense tensor
_KEY_SUFFIX = len(".jpg")
_log = logging.getLogger(__name__)


def read_manifest(shards_dir: str | os.PathLike) -> tuple[dict, list[str], list[str]]:
    """The manifest of a packed folder and the paths of its tar and index files; clear errors when unusable."""
    folder = Path(shards_dir)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {folder} is not a packed shard folder (create one with `seer data pack SRC {folder}`)"
        )
    manifest = json.loads(path.read_text())
    if not manifest.get("shards") or manifest.get("kept", 0) == 0:
        raise ValueError(f"{path} lists no samples: nothing was packed into {folder} (see its 'skipped')")
    tars = [str(folder / s["tar"]) for s in manifest["shards"]]
    idxs = [str(folder / s["idx"]) for s in manifest["shards"]]
    missing = [p for p in tars + idxs if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{path} lists files that are missing: {missing[:3]}")
    return manifest, tars, idxs


def class_names(manifest: dict, shards_dir: str | os.PathLike, key: str) -> list[str]:
    """The class names in the manifest of packed folder `shards_dir`; one error naming config key `key` when it was
    packed without labels."""
    classes = manifest["classes"]
    if not classes:
        raise ValueError(f"{key}={shards_dir} holds unlabelled images (packed with --no-labels or from a flat "
                         "folder): this needs class labels")
    return classes


def matching_class_names(train_shards, test_shards, train_key: str, test_key: str) -> list[str]:
    """The class names shared by a train and a test folder; one error when either is unlabelled or they differ."""
    classes = class_names(read_manifest(train_shards)[0], train_shards, train_key)
    test_classes = class_names(read_manifest(test_shards)[0], test_shards, test_key)
    if test_classes != classes:
        raise ValueError(f"{test_key} has {len(test_classes)} classes ({', '.join(test_classes[:3])}, ...) but "
                         f"{train_key} has {len(classes)} ({', '.join(classes[:3])}, ...): pack both with the same "
                         "class folders")
    return classes


def read_samples(tars, idxs, labelled: bool, **reader_args):
    """The reader op (named READER): encoded images and (when labelled) their raw .cls bytes, else None."""
    outputs = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=["jpg", "cls"] if labelled else ["jpg"],
        missing_component_behavior="error",
        name=READER,
        **reader_args,
    )
    return (outputs[0], outputs[1]) if labelled else (outputs, None)


def label_and_index_outputs(labels, jpegs, with_index: bool, device: str) -> tuple[list, list[str]]:
    """Label bytes and (optionally) sample-key bytes as extra graph outputs, with their names ("label", "index"),
    on `device` ("cpu" or "cuda"); ascii_to_int parses them to int64 in torch."""
    outputs, names = [], []
    if labels is not None:
        outputs.append(fn.pad(labels, shape=[LABEL_WIDTH], fill_value=0))
        names.append("label")
    if with_index:
        # source_info is "<tar>:<offset>:<key>.jpg"; the key is the KEY_DIGITS characters before ".jpg".
        info = fn.get_property(jpegs, key="source_info")
        start = fn.cast(info.shape() - (KEY_DIGITS + _KEY_SUFFIX), dtype=types.INT32)
        outputs.append(fn.slice(info, start=start, shape=[KEY_DIGITS], axes=[0]))
        names.append("index")
    if device == "cuda":
        outputs = [o.gpu() for o in outputs]
    return outputs, names


def ascii_to_int(chars: torch.Tensor) -> torch.Tensor:
    """(B, W) uint8 ASCII digits padded with non-digits -> int64 (B,)."""
    digits = chars.long() - ord("0")
    is_digit = (digits >= 0) & (digits <= 9)
    value = torch.zeros(chars.shape[0], dtype=torch.int64, device=chars.device)
    for column in range(chars.shape[1]):
        value = torch.where(is_digit[:, column], value * 10 + digits[:, column], value)
    return value


def batch_labels(batch: dict, like: torch.Tensor) -> torch.Tensor:
    """int64 (B,) labels of a batch of graph outputs; -1 for each sample of `like` when the shards are unlabelled."""
    if "label" in batch:
        return ascii_to_int(batch["label"])
    return torch.full((like.shape[0],), -1, dtype=torch.int64, device=like.device)


# ------------------------------------------------------------------------------------------------------ guard
@functools.cache
def _gray_jpeg() -> np.ndarray:
    """The stand-in for a bad sample: mid-gray, so its crops carry no content (one of VISSL's two choices)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "JPEG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def needs_guard(manifest: dict) -> bool:
    """Whether the loaders must check every sample of the packed folder with this manifest: not when `seer data
    pack` already checked them all with the same jpeg_problem, which saves a Python pass over every sample (42 us
    per image in benchmarks/results/data_cpu.json)."""
    return manifest.get("jpeg_check") != JPEG_CHECK


def _guard_batch(encoded: list[np.ndarray], sources: list[np.ndarray]) -> tuple[list, list]:
    """DALI python_function: the batch with each bad sample replaced by the gray JPEG, and a 0/1 flag per sample."""
    safe, replaced = [], []
    for data, source in zip(encoded, sources):
        problem = jpeg_problem(data)
        if problem is not None:
            _log.warning("replaced a bad sample by a gray image (%s): %s", problem, source.tobytes().decode())
        safe.append(data if problem is None else _gray_jpeg())
        replaced.append(np.array(problem is not None, dtype=np.uint8))
    return safe, replaced


def guard_samples(jpegs, manifest: dict, guard: bool | None) -> tuple:
    """(encoded images safe to decode, extra outputs, their names) for a graph reading the packed folder with this
    manifest. guard: check every sample and replace bad ones, adding the output "replaced" (uint8 per sample: 1
    where a bad sample was replaced; it stays on the CPU, so counting it never waits for a GPU); None: unless pack
    checked them (needs_guard).

    The check is a Python operator: it runs on the CPU side of CPU and GPU graphs alike, but DALI cannot serialize
    it.
    """
    if not (needs_guard(manifest) if guard is None else guard):
        return jpegs, [], []
    sources = fn.get_property(jpegs, key="source_info")
    safe, replaced = fn.python_function(jpegs, sources, function=_guard_batch, num_outputs=2, batch_processing=True)
    return safe, [replaced], ["replaced"]

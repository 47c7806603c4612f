"""Pack images into webdataset tar shards (+ DALI index files + manifest.json) that the DALI loaders read.

Every image is validated here, once, because DALI cannot skip a bad file at training time (it errors or crashes):
only files that Pillow fully decodes reach a shard; the rest are counted by reason in the manifest.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import tarfile
from collections import Counter, deque
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from dataloading.sources import DATASETS, load_idx

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}"
KEY_DIGITS = 10  # sample keys are the write position, zero-padded: 0000000042.jpg (room for 10^10 samples)
FOLDER_ORDER_SEED = 0  # folder packs are written in a fixed random order: DALI's shuffle buffer only mixes locally
MIN_ITEMS_FOR_POOL = 256  # below this, starting worker processes (~0.5 s each) costs more than it saves
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}

# One result per input item: (JPEG bytes, None) when kept, (None, reason) when skipped.
Prepared = tuple[bytes | None, str | None]


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _encode_gray_arrays(images: np.ndarray, quality: int) -> list[Prepared]:
    return [(_encode_jpeg(Image.fromarray(image, "L"), quality), None) for image in images]


def _prepare_file(path: str, quality: int, max_side: int | None) -> Prepared:
    """Validate one file by decoding it fully; keep JPEG bytes as they are when nothing needs changing."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "unreadable"
    if not data:
        return None, "empty"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.load()  # full decode: truncated or corrupt data raises here, not later in DALI
            too_big = max_side is not None and max(image.size) > max_side
            if image_format == "JPEG" and image.mode in ("L", "RGB") and not too_big:
                return data, None
            # Re-encoding drops EXIF, so apply its orientation now (DALI applies it to kept JPEGs).
            image = ImageOps.exif_transpose(image).convert("L" if image.mode in _GRAY_MODES else "RGB")
            if too_big:
                image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return _encode_jpeg(image, quality), None
    except UnidentifiedImageError:
        return None, "not_an_image"
    except Image.DecompressionBombError:
        return None, "too_many_pixels"
    except Exception:  # noqa: BLE001 - any decoder failure means a broken file, never a crash of the whole pack
        return None, "corrupt"


def _prepare_files(paths: list[str], quality: int, max_side: int | None) -> list[Prepared]:
    return [_prepare_file(path, quality, max_side) for path in paths]


def _scan_folder(root: Path, labels_from_folders: bool) -> tuple[list[str], list[int | None], list[str] | None, list]:
    """All files under root in a fixed shuffled order, their labels, class names, and files refused up front."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    classes = class_dirs if labels_from_folders and class_dirs else None
    class_index = {name: i for i, name in enumerate(classes or [])}
    paths, labels, refused = [], [], []
    for path in files:
        parts = path.relative_to(root).parts
        if classes is not None and len(parts) == 1:
            refused.append({"path": str(path), "reason": "outside_class_folder"})
            continue
        paths.append(str(path))
        labels.append(class_index[parts[0]] if classes is not None else None)
    order = list(range(len(paths)))
    random.Random(FOLDER_ORDER_SEED).shuffle(order)
    return [paths[i] for i in order], [labels[i] for i in order], classes, refused


def _tar_member(name: str, data: bytes) -> bytes:
    """One regular-file entry of a POSIX ustar archive: 512-byte header, data, zero padding to 512 bytes.

    Written by hand because tarfile.addfile costs ~70 us per entry, which dominated packing tiny images.
    """
    header = bytearray(tarfile.BLOCKSIZE)
    header[0 : len(name)] = name.encode()  # names here are short ASCII keys, well under the 100-byte limit
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = header[116:124] = b"0000000\0"  # uid, gid
    header[124:136] = b"%011o\0" % len(data)  # size
    header[136:148] = b"00000000000\0"  # mtime 0: identical input gives identical shards
    header[148:156] = b" " * 8  # checksum field counts as spaces while summing
    header[156:157] = tarfile.REGTYPE
    header[257:265] = b"ustar\x0000"  # POSIX ustar magic + version
    header[148:156] = b"%06o\0 " % sum(header)
    padding = -len(data) % tarfile.BLOCKSIZE
    return bytes(header) + data + b"\0" * padding


class _ShardWriter:
    """Writes samples into shard-NNNNNN.tar + .idx (DALI wds2idx v1.2 format); a shard appears under its final
    name only once complete."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards: list[dict] = []
        self._file = None
        self._offset = 0  # bytes written to the current tar
        self._index_lines: list[str] = []
        self._count = 0  # samples written in total: the next sample's key

    def _stem(self) -> str:
        return SHARD_PATTERN.format(len(self.shards))

    def add(self, jpeg: bytes, label: int | None) -> None:
        if self._file is None:
            self._file = open(self.out_dir / f"{self._stem()}.tar.tmp", "wb")
            self._offset = 0
        key = f"{self._count:0{KEY_DIGITS}d}"
        entries = [("jpg", jpeg)] + ([("cls", str(label).encode())] if label is not None else [])
        fields = []
        for ext, data in entries:
            member = _tar_member(f"{key}.{ext}", data)
            self._file.write(member)
            fields += [ext, str(self._offset + tarfile.BLOCKSIZE), str(len(data)), f"{key}.{ext}"]
            self._offset += len(member)
        self._index_lines.append(" ".join(fields))
        self._count += 1
        if len(self._index_lines) == self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        if self._file is None:
            return
        self._file.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        self._file.close()
        self._file = None
        stem = self._stem()
        tmp_tar, tmp_idx = self.out_dir / f"{stem}.tar.tmp", self.out_dir / f"{stem}.idx.tmp"
        tmp_idx.write_text(f"v1.2 {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n")
        os.replace(tmp_idx, self.out_dir / f"{stem}.idx")
        os.replace(tmp_tar, self.out_dir / f"{stem}.tar")  # the tar last: a visible .tar always has its .idx
        self.shards.append({"tar": f"{stem}.tar", "idx": f"{stem}.idx", "samples": len(self._index_lines)})
        self._index_lines = []


def _ordered_map(fn: Callable, chunks: Iterable, executor: Executor | None, in_flight: int) -> Iterator:
    """Results of fn over chunks in input order, with at most `in_flight` chunks queued (bounded memory)."""
    if executor is None:
        yield from map(fn, chunks)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append(executor.submit(fn, chunk))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunks(items, size: int) -> Iterator:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pack(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 10000,
    jpeg_quality: int = 95,
    max_side: int | None = None,
    labels_from_folders: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Pack a folder of images or a dataset spec ("fashion-mnist:train", "mnist:test", ...) into shards in out_dir.

    Returns the manifest (also written to out_dir/manifest.json).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, _, split = str(source).partition(":")
    refused: list[dict] = []
    if name in DATASETS and split and not Path(source).exists():
        images, dataset_labels, classes = load_idx(name, split)
        items, labels, source_desc = images, [int(v) for v in dataset_labels], f"{name}:{split}"
        prepare = _encode_gray_arrays
        prepare_args = (jpeg_quality,)
    else:
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a folder, and not a dataset spec like 'fashion-mnist:train'")
        items, labels, classes, refused = _scan_folder(root.resolve(), labels_from_folders)
        source_desc = str(root.resolve())
        prepare = _prepare_files
        prepare_args = (jpeg_quality, max_side)

    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    chunk_size = max(1, min(256, len(items) // (workers * 16)))
    use_pool = workers > 1 and len(items) > MIN_ITEMS_FOR_POOL
    # spawn, not fork: the caller may already run DALI or torch threads, which a forked child would inherit.
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if use_pool else None
    writer = _ShardWriter(out, shard_size)
    skipped_files = list(refused)
    bar = tqdm(total=len(items), disable=not progress, unit="img", desc=f"pack {source_desc}")
    try:
        results = _ordered_map(
            _PrepareChunk(prepare, prepare_args), _chunks(items, chunk_size), executor, in_flight=4 * workers
        )
        position = 0
        for chunk_results in results:
            for jpeg, reason in chunk_results:
                if jpeg is not None:
                    writer.add(jpeg, labels[position])
                else:
                    skipped_files.append({"path": str(items[position]), "reason": reason})
                position += 1
            bar.update(len(chunk_results))
        writer.finish_shard()
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)

    manifest = {
        "source": source_desc,
        "kept": sum(s["samples"] for s in writer.shards),
        "skipped": dict(Counter(f["reason"] for f in skipped_files)),
        "skipped_files": skipped_files,
        "shards": writer.shards,
        "classes": classes,
        "jpeg_quality": jpeg_quality,
        "max_side": max_side,
    }
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    _remove_stale_shards(out, {s["tar"] for s in writer.shards} | {s["idx"] for s in writer.shards})
    return manifest


class _PrepareChunk:
    """Picklable callable for the worker processes: prepare(chunk, *args)."""

    def __init__(self, prepare: Callable, args: tuple):
        self.prepare, self.args = prepare, args

    def __call__(self, chunk) -> list[Prepared]:
        return self.prepare(chunk, *self.args)


def _remove_stale_shards(out: Path, current: set[str]) -> None:
    """Shards of an earlier, larger pack into the same folder would confuse anyone listing the folder."""
    for path in out.glob("shard-*"):
        if path.name not in current and path.suffix in (".tar", ".idx", ".tmp"):
            path.unlink()

"""Pack images into webdataset tar shards (+ DALI index files + manifest.json) that the DALI loaders read.

Every image is validated here, once, because DALI cannot skip a bad file at training time (it errors or crashes):
only files that Pillow fully decodes reach a shard, as 8-bit gray or RGB JPEG with any EXIF orientation applied;
the rest are counted by reason in the manifest. Reasons: empty, unreadable, not_an_image, unsupported_format,
unsupported_mode, corrupt (truncated or undecodable), too_many_pixels (decompression bombs),
extreme_aspect_ratio, duplicate (the same file bytes as a file packed earlier; `duplicate_of` names it) and
outside_class_folder.

Packing can be interrupted and resumed: OUT/pack-journal.jsonl holds the source and options of the pack (first
line), then one line per complete shard, appended only after that shard's files have their final names. A new run
into the same OUT continues after the last journalled shard and writes the same shards, byte for byte, as an
uninterrupted run; manifest.json, written last, marks the pack complete. Journal lines of folder packs also list
the source file (relative to SRC) and content digest of every sample, in key order.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import stat
import sys
import tarfile
import warnings
from collections import Counter, deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from dataloading.jpeg import JPEG_CHECK, MAX_PIXELS, MAX_SIDE, jpeg_problem
from dataloading.sources import DATASETS, load_idx

MANIFEST = "manifest.json"
JOURNAL = "pack-journal.jsonl"
JOURNAL_FORMAT = 1
SHARD_PATTERN = "shard-{:06d}"
KEY_DIGITS = 10  # sample keys are the write position, zero-padded: 0000000042.jpg (room for 10^10 samples)
FOLDER_ORDER_SEED = 0  # folder packs are written in a fixed random order: DALI's shuffle buffer only mixes locally
MIN_ITEMS_FOR_POOL = 256  # below this, starting worker processes (~0.5 s each) costs more than it saves
# Formats Pillow decodes without external programs (EPS, for one, would run Ghostscript on an untrusted file).
FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "AVIF", "BMP", "DIB", "GIF", "TIFF", "PPM"}
MAX_ASPECT_RATIO = 50  # longer side / shorter side beyond which a file is a strip or a line, not a picture
_SIXTEEN_BIT_GRAY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_GRAY_MODES = {"1", "L", "LA"} | _SIXTEEN_BIT_GRAY
_ALPHA_MODES = {"RGBA", "LA", "PA"}
_MODES = {"P", "RGB", "RGBX", "CMYK", "YCbCr"} | _GRAY_MODES | _ALPHA_MODES  # the rest (F, LAB, HSV, ...) is refused

# One result per input item: (JPEG bytes or None, skip reason or None, digest of the file bytes or None).
Prepared = tuple[bytes | None, str | None, str | None]


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _encode_gray_arrays(images: np.ndarray, quality: int) -> list[Prepared]:
    return [(_encode_jpeg(Image.fromarray(image, "L"), quality), None, None) for image in images]


def _to_gray_or_rgb(image: Image.Image) -> Image.Image:
    """8-bit L or RGB. 16-bit gray keeps its top 8 bits (as Pillow does for 16-bit RGB; its own I;16 -> L
    conversion clips at 255 instead); transparent pixels are composited over white."""
    if image.mode in _SIXTEEN_BIT_GRAY:
        levels = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(levels.astype(np.uint8), "L")
    gray = image.mode in _GRAY_MODES
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        image = image.convert("LA" if gray else "RGBA")
        background = Image.new("L" if gray else "RGB", image.size, "white")
        background.paste(image.convert(background.mode), mask=image.getchannel("A"))
        return background
    return image.convert("L" if gray else "RGB")


def _validate(data: bytes, quality: int, max_side: int | None) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None) for a good image, (None, reason) otherwise. JPEG bytes are kept as they are when
    nothing needs changing."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow refuses twice its limit already when reading the header
        return None, "too_many_pixels"
    except UnidentifiedImageError:
        return None, "not_an_image"
    except Exception:  # noqa: BLE001 - a header that crashes a decoder plugin is a broken file
        return None, "corrupt"
    with image:
        if image.format not in FORMATS:
            return None, "unsupported_format"
        if image.mode not in _MODES:
            return None, "unsupported_mode"
        width, height = image.size
        if width * height > MAX_PIXELS:  # refused from the header, before decoding
            return None, "too_many_pixels"
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            return None, "extreme_aspect_ratio"
        try:
            image.load()  # full decode (first frame): truncated or corrupt data raises here, not later in DALI
            too_big = max_side is not None and max(width, height) > max_side
            if max(width, height) > MAX_SIDE and not too_big:
                return None, "side_too_long"  # DALI's crop crashed on such images; --max-side shrinks them instead
            if (image.format == "JPEG" and image.mode in ("L", "RGB") and not too_big
                    and image.getexif().get(ExifTags.Base.Orientation, 1) == 1 and jpeg_problem(data) is None):
                return data, None  # kept byte for byte; other JPEG processes (lossless, arithmetic) are re-encoded
            image = _to_gray_or_rgb(ImageOps.exif_transpose(image))  # re-encoding drops EXIF: rotate now
            if too_big:
                image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return _encode_jpeg(image, quality), None
        except Exception:  # noqa: BLE001 - any decoder failure means a broken file, never a crash of the whole pack
            return None, "corrupt"


def prepare_file(path: str, quality: int, max_side: int | None) -> Prepared:
    """An image file as pack stores it: (JPEG bytes, None, digest of the file bytes) for a good image, else (None,
    skip reason, digest or None). Plain JPEGs are kept byte for byte, other images re-encoded as JPEG at
    `quality`; images with a side over max_side are shrunk to it (None: sides over MAX_SIDE are refused)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "unreadable", None
    if not data:
        return None, "empty", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd metadata and bomb warnings: the decode alone decides
        jpeg, reason = _validate(data, quality, max_side)
    return jpeg, reason, _digest(data)


def _prepare_files(paths: list[str], quality: int, max_side: int | None) -> list[Prepared]:
    return [prepare_file(path, quality, max_side) for path in paths]


@dataclass
class _Inputs:
    """What a pack reads, in the order it writes it."""

    description: str  # the source as the journal and manifest name it
    items: list[str] | np.ndarray  # file paths or images
    labels: list[int | None]
    classes: list[str] | None
    digest: str  # identity of the listing (names and sizes) or data: a resumed run must see the same inputs
    prepare: Callable[..., list[Prepared]]
    prepare_args: tuple
    root: Path | None = None  # folder packs: sources are recorded relative to it
    refused: list[dict] = field(default_factory=list)  # files refused from their place in the folder alone


def _digest(*parts: bytes) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _scan_folder(root: Path, out: Path, labels_from_folders: bool, quality: int, max_side: int | None) -> _Inputs:
    """All files under root (but not under out) in a fixed shuffled order, their labels, class names, and files
    refused up front."""
    sizes = {}  # one stat per file (a billion-file tree is stat-bound): regular files, symlinks followed
    for path in root.rglob("*"):
        if out not in path.parents:
            try:
                info = path.stat()
            except OSError:  # a broken link or an unreadable entry: not a file to pack
                continue
            if stat.S_ISREG(info.st_mode):
                sizes[path] = info.st_size
    files = sorted(sizes)
    relative = [p.relative_to(root) for p in files]
    class_dirs = sorted({r.parts[0] for r in relative if len(r.parts) > 1})
    classes = class_dirs if labels_from_folders and class_dirs else None
    class_index = {name: i for i, name in enumerate(classes or [])}
    listing = "".join(f"{r.as_posix()}\t{sizes[p]}\n" for p, r in zip(files, relative))
    paths, labels, refused = [], [], []
    for path, rel in zip(files, relative):
        if classes is not None and len(rel.parts) == 1:
            refused.append({"path": str(path), "reason": "outside_class_folder"})
            continue
        paths.append(str(path))
        labels.append(class_index[rel.parts[0]] if classes is not None else None)
    order = list(range(len(paths)))
    random.Random(FOLDER_ORDER_SEED).shuffle(order)
    return _Inputs(str(root), [paths[i] for i in order], [labels[i] for i in order], classes,
                   _digest(listing.encode()), _prepare_files, (quality, max_side), root, refused)


def _read_inputs(source, out: Path, labels_from_folders: bool, quality: int, max_side: int | None) -> _Inputs:
    name, _, split = str(source).partition(":")
    if name in DATASETS and split and not Path(source).exists():
        images, labels, classes = load_idx(name, split)
        return _Inputs(f"{name}:{split}", images, [int(v) for v in labels], classes,
                       _digest(images.tobytes(), labels.tobytes()), _encode_gray_arrays, (quality,))
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder, and not a dataset spec like 'fashion-mnist:train'")
    return _scan_folder(root.resolve(), out.resolve(), labels_from_folders, quality, max_side)


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


def _write_durably(file, data: bytes) -> None:
    file.write(data)
    file.flush()
    os.fsync(file.fileno())  # a journal line must never name a shard whose bytes could still be lost


class _ShardWriter:
    """Writes samples into shard-NNNNNN.tar + .idx (DALI wds2idx v1.2 format); a shard appears under its final
    name only once complete (written as *.tmp, then renamed)."""

    def __init__(self, out_dir: Path, shard_size: int, first_shard: int, first_key: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self._shard = first_shard  # number of the shard being written
        self._count = first_key  # samples written in total: the next sample's key
        self._file = None
        self._offset = 0  # bytes written to the current tar
        self._index_lines: list[str] = []

    def _stem(self) -> str:
        return SHARD_PATTERN.format(self._shard)

    def add(self, jpeg: bytes, label: int | None) -> dict | None:
        """Append one sample; returns the shard's record when this sample completed it."""
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
        return self.finish_shard() if len(self._index_lines) == self.shard_size else None

    def finish_shard(self) -> dict | None:
        """Close the current shard and give it its final names; its record, or None when no shard is open."""
        if self._file is None:
            return None
        _write_durably(self._file, b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        self._file.close()
        self._file = None
        stem = self._stem()
        tmp_tar, tmp_idx = self.out_dir / f"{stem}.tar.tmp", self.out_dir / f"{stem}.idx.tmp"
        index_text = f"v1.2 {len(self._index_lines)}\n" + "\n".join(self._index_lines) + "\n"
        with open(tmp_idx, "wb") as index:
            _write_durably(index, index_text.encode())
        os.replace(tmp_idx, self.out_dir / f"{stem}.idx")
        os.replace(tmp_tar, self.out_dir / f"{stem}.tar")  # the tar last: a visible .tar always has its .idx
        record = {"tar": f"{stem}.tar", "idx": f"{stem}.idx", "samples": len(self._index_lines)}
        self._index_lines = []
        self._shard += 1
        return record


class _Journal:
    """OUT/pack-journal.jsonl: a header line (source, options, inputs), then one line per complete shard."""

    def __init__(self, out: Path, header: dict):
        self.path, self.header = out / JOURNAL, header
        self.records: list[dict] = []
        # The part after the last newline is a torn write.
        lines = self.path.read_bytes().split(b"\n")[:-1] if self.path.exists() else []
        if not lines:  # a new pack (the header is written before any shard)
            if (out / MANIFEST).exists() or any(out.glob("shard-*")):
                raise FileExistsError(f"{out} holds shards but no {JOURNAL} (an older or hand-made pack): "
                                      f"pack into another folder, or delete {out} to repack")
            with open(self.path, "wb") as file:
                _write_durably(file, _json_line(header))
            return
        self._check_header(json.loads(lines[0]), out)
        kept_bytes = len(lines[0]) + 1
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not ((out / record["tar"]).is_file() and (out / record["idx"]).is_file()):
                break  # a journalled shard someone deleted: redo the pack from there
            self.records.append(record)
            kept_bytes += len(line) + 1
        if kept_bytes < self.path.stat().st_size:
            os.truncate(self.path, kept_bytes)  # the next record is appended right after the last good one

    def _check_header(self, found: dict, out: Path) -> None:
        if found.get("format") != JOURNAL_FORMAT:
            raise FileExistsError(f"{self.path} has format {found.get('format')}, this seer writes "
                                  f"{JOURNAL_FORMAT}: delete {out} to repack")
        asked = {"source": self.header["source"], **self.header["options"]}
        held = {"source": found.get("source"), **found.get("options", {})}
        differences = [f"{key}={held.get(key)!r} there, {value!r} asked" for key, value in asked.items()
                       if held.get(key) != value]
        if differences:
            raise FileExistsError(f"{out} holds another pack ({'; '.join(differences)}): pack into another "
                                  f"folder, or delete {out} to repack")
        if (found["inputs"], found["inputs_digest"]) != (self.header["inputs"], self.header["inputs_digest"]):
            raise FileExistsError(f"{self.header['source']} changed since {out} was packed from it "
                                  f"({found['inputs']} inputs then, {self.header['inputs']} now): "
                                  f"delete {out} to repack")

    def append(self, record: dict) -> None:
        with open(self.path, "ab") as file:
            _write_durably(file, _json_line(record))
        self.records.append(record)


def _json_line(value: dict) -> bytes:
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


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


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"pack: {message}", file=sys.stderr)


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

    Resumes an interrupted pack into the same out_dir; returns at once when out_dir already holds the complete pack.
    A different source or different options in the same out_dir raise FileExistsError. `progress`: a progress bar
    and status lines on stderr. Returns the manifest (also written to out_dir/manifest.json).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out = Path(out_dir)
    inputs = _read_inputs(source, out, labels_from_folders, jpeg_quality, max_side)
    out.mkdir(parents=True, exist_ok=True)
    options = {"shard_size": shard_size, "jpeg_quality": jpeg_quality, "max_side": max_side,
               "labels_from_folders": labels_from_folders}
    journal = _Journal(out, {"format": JOURNAL_FORMAT, "source": inputs.description, "options": options,
                             "inputs": len(inputs.items), "inputs_digest": inputs.digest})
    records = journal.records
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if len(manifest["shards"]) == len(records):
            _say(progress, f"{out} already holds the complete pack of {inputs.description}; nothing to do")
            return manifest
        (out / MANIFEST).unlink()  # a listed shard went missing: the pack is redone from there
    for stale in out.glob("*.tmp"):  # files an interrupted run was writing
        stale.unlink()
    start = records[-1]["end"] if records else 0
    first_key = sum(r["samples"] for r in records)
    if records:
        _say(progress, f"resuming {out} after {len(records)} complete shards ({first_key} samples, "
                       f"{start} of {len(inputs.items)} inputs done)")
    # The file kept for each content digest, relative to the source folder.
    kept_source = {d: s for r in records for d, s in zip(r["digests"], r["sources"])}
    writer = _ShardWriter(out, shard_size, len(records), first_key)
    skipped, sources, digests = [], [], []  # what the shard being written covers

    remaining = inputs.items[start:]
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    chunk_size = max(1, min(256, len(remaining) // (workers * 16)))
    use_pool = workers > 1 and len(remaining) > MIN_ITEMS_FOR_POOL
    # spawn, not fork: the caller may already run DALI or torch threads, which a forked child would inherit.
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if use_pool else None
    bar = tqdm(total=len(inputs.items), initial=start, disable=not progress, unit="img",
               desc=f"pack {inputs.description}")
    try:
        results = _ordered_map(_PrepareChunk(inputs.prepare, inputs.prepare_args), _chunks(remaining, chunk_size),
                               executor, in_flight=4 * workers)
        position = start
        for chunk_results in results:
            for jpeg, reason, digest in chunk_results:
                if jpeg is not None and digest in kept_source:
                    skipped.append({"path": str(inputs.items[position]), "reason": "duplicate",
                                    "duplicate_of": str(inputs.root / kept_source[digest])})
                elif jpeg is None:
                    skipped.append({"path": str(inputs.items[position]), "reason": reason})
                else:
                    if digest is not None:
                        kept_source[digest] = Path(inputs.items[position]).relative_to(inputs.root).as_posix()
                        sources.append(kept_source[digest])
                        digests.append(digest)
                    shard = writer.add(jpeg, inputs.labels[position])
                    if shard is not None:
                        journal.append({**shard, "end": position + 1, "skipped": skipped, "sources": sources,
                                        "digests": digests})
                        skipped, sources, digests = [], [], []
                position += 1
            bar.update(len(chunk_results))
        shard = writer.finish_shard()
        if shard is not None:
            journal.append({**shard, "end": len(inputs.items), "skipped": skipped, "sources": sources,
                            "digests": digests})
            skipped = []
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(cancel_futures=True)

    skipped_files = inputs.refused + [s for r in journal.records for s in r["skipped"]] + skipped
    manifest = {
        "source": inputs.description,
        "kept": sum(r["samples"] for r in journal.records),
        "skipped": dict(Counter(f["reason"] for f in skipped_files)),
        "skipped_files": skipped_files,
        "shards": [{key: r[key] for key in ("tar", "idx", "samples")} for r in journal.records],
        "classes": inputs.classes,
        "jpeg_quality": jpeg_quality,
        "max_side": max_side,
        "jpeg_check": JPEG_CHECK,  # every stored JPEG passed it (kept as is only if so, else re-encoded by Pillow)
    }
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


class _PrepareChunk:
    """Picklable callable for the worker processes: prepare(chunk, *args)."""

    def __init__(self, prepare: Callable, args: tuple):
        self.prepare, self.args = prepare, args

    def __call__(self, chunk) -> list[Prepared]:
        return self.prepare(chunk, *self.args)

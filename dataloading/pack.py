"""Pack images into webdataset tar shards (+ DALI index files + manifest.json) that the DALI loaders read.

Every image is validated here, once, because DALI cannot skip a bad file at training time (it errors or crashes):
only files that Pillow fully decodes reach a shard, as 8-bit gray or RGB JPEG with any EXIF orientation applied;
every other entry of the source tree (except folders, which are walked) is counted by reason in the manifest.
Reasons: empty, unreadable (a file or a folder that cannot be read), broken_link, link_loop (a link that resolves
to itself or to a folder it is inside), special_file (FIFO, socket, device), not_an_image, unsupported_format,
unsupported_mode, corrupt (truncated or undecodable), too_many_pixels (decompression bombs), extreme_aspect_ratio,
side_too_long, too_small (a side under min_side px, as stored), duplicate (the same file bytes as a file packed
earlier; `duplicate_of` names it) and outside_class_folder. Links to files and folders are followed.

File names may hold any bytes: samples are keyed by their position in the pack, never by name, and the manifest
and journal name files as text with each byte that is not UTF-8 written as \\xNN (display_path).

Packing can be interrupted and resumed: OUT/pack-journal.jsonl holds the source and options of the pack (first
line), then one line per complete shard, appended only after that shard's files have their final names. A new run
into the same OUT continues after the last journalled shard and writes the same shards, byte for byte, as an
uninterrupted run; manifest.json, written last, marks the pack complete. Journal lines of folder packs also list
the source file (relative to SRC) and content digest of every sample, in key order.

Worker processes die with the packer (even on kill -9): they ask Linux to kill them when their parent exits.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import multiprocessing
import os
import random
import signal
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
DEFAULT_MIN_SIDE = 16  # px; smaller images (icons, tracking pixels) are blown up for every crop, even the demo's 16 px
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


def _encode_gray_arrays(images: np.ndarray, quality: int, min_side: int) -> list[Prepared]:
    if min(images.shape[1:3]) < min_side:
        return [(None, "too_small", None)] * len(images)
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


def _validate(data: bytes, quality: int, max_side: int | None, min_side: int) -> tuple[bytes | None, str | None]:
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
        if min(width, height) < min_side:
            return None, "too_small"
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
                if min(image.size) < min_side:  # a long strip shrunk to max_side
                    return None, "too_small"
            return _encode_jpeg(image, quality), None
        except Exception:  # noqa: BLE001 - any decoder failure means a broken file, never a crash of the whole pack
            return None, "corrupt"


def prepare_file(path: str, quality: int, max_side: int | None, min_side: int = 1) -> Prepared:
    """An image file as pack stores it: (JPEG bytes, None, digest of the file bytes) for a good image, else (None,
    skip reason, digest or None). Plain JPEGs are kept byte for byte, other images re-encoded as JPEG at
    `quality`; images with a side over max_side are shrunk to it (None: sides over MAX_SIDE are refused); images
    with a side under min_side px (after shrinking) are refused."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "unreadable", None
    if not data:
        return None, "empty", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd metadata and bomb warnings: the decode alone decides
        jpeg, reason = _validate(data, quality, max_side, min_side)
    return jpeg, reason, _digest(data)


def _prepare_files(paths: list[str], quality: int, max_side: int | None, min_side: int) -> list[Prepared]:
    return [prepare_file(path, quality, max_side, min_side) for path in paths]


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
    names: list[str] | None = None  # folder packs: each item's path relative to the folder, as display_path writes it
    refused: list[dict] = field(default_factory=list)  # entries refused from the folder listing alone

    def name(self, position: int) -> str:
        """How the manifest names the item at `position`: its path as display_path writes it, or dataset[index]."""
        if self.names is None:
            return f"{self.description}[{position}]"
        return os.path.join(self.description, self.names[position])


def _digest(*parts: bytes) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def display_path(path: str | bytes | os.PathLike) -> str:
    """A file name as text that any JSON reader or terminal takes: each byte that is not UTF-8 written as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _stat_failure(error: OSError, is_link: bool) -> str:
    if error.errno == errno.ELOOP:
        return "link_loop"
    if is_link and error.errno in (errno.ENOENT, errno.ENOTDIR):
        return "broken_link"
    return "unreadable"


def _walk(root: str, out: str) -> tuple[dict[str, int], list[dict]]:
    """The regular files under root, links followed, except under out: {path: size}; and every other entry that is
    not a folder, refused by reason. One stat per entry (a billion-file tree is stat-bound)."""
    sizes, refused = {}, []
    try:
        out_info = os.stat(out)
        excluded = (out_info.st_dev, out_info.st_ino)
    except OSError:  # not created yet: nothing of it can be in root
        excluded = None
    root_info = os.stat(root)
    folders = [(root, frozenset([(root_info.st_dev, root_info.st_ino)]))]  # each with the folders it is inside
    while folders:
        folder, inside = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            refused.append({"path": display_path(folder), "reason": "unreadable"})
            continue
        for entry in entries:
            try:
                info = entry.stat()  # follows links
            except OSError as error:
                refused.append({"path": display_path(entry.path), "reason": _stat_failure(error, entry.is_symlink())})
                continue
            if stat.S_ISREG(info.st_mode):
                sizes[entry.path] = info.st_size
            elif stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                if identity in inside:  # a link to a folder it is in: walking it would never end
                    refused.append({"path": display_path(entry.path), "reason": "link_loop"})
                elif identity != excluded:
                    folders.append((entry.path, inside | {identity}))
            else:
                refused.append({"path": display_path(entry.path), "reason": "special_file"})
    return sizes, sorted(refused, key=lambda entry: entry["path"])  # listings come in no fixed order


def _scan_folder(root: Path, out: Path, labels_from_folders: bool, prepare_args: tuple) -> _Inputs:
    """All files under root (but not under out) in a fixed shuffled order, their labels, class names, and entries
    refused up front."""
    sizes, refused = _walk(str(root), str(out))
    prefix = len(os.path.join(root, ""))
    # Sorted by name bytes, folder by folder (a NUL sorts before any byte a name can hold).
    files = sorted(sizes, key=lambda path: os.fsencode(path[prefix:]).replace(b"/", b"\0"))
    relative = [os.fsencode(path[prefix:]) for path in files]
    parts = [name.split(b"/") for name in relative]
    class_dirs = sorted({p[0] for p in parts if len(p) > 1})
    classes = [display_path(name) for name in class_dirs] if labels_from_folders and class_dirs else None
    class_index = {name: i for i, name in enumerate(class_dirs)}
    listing = b"".join(b"%s\t%d\n" % (name, sizes[path]) for path, name in zip(files, relative))
    paths, names, labels = [], [], []
    for path, name, name_parts in zip(files, relative, parts):
        if classes is not None and len(name_parts) == 1:
            refused.append({"path": display_path(path), "reason": "outside_class_folder"})
            continue
        paths.append(path)
        names.append(display_path(name))
        labels.append(class_index[name_parts[0]] if classes is not None else None)
    order = list(range(len(paths)))
    random.Random(FOLDER_ORDER_SEED).shuffle(order)
    return _Inputs(display_path(root), [paths[i] for i in order], [labels[i] for i in order], classes,
                   _digest(listing), _prepare_files, prepare_args, [names[i] for i in order], refused)


def _read_inputs(source, out: Path, labels_from_folders: bool, quality: int, max_side: int | None,
                 min_side: int) -> _Inputs:
    source = os.fsdecode(source)
    name, _, split = source.partition(":")
    if name in DATASETS and split and not Path(source).exists():
        images, labels, classes = load_idx(name, split)
        return _Inputs(f"{name}:{split}", images, [int(v) for v in labels], classes,
                       _digest(images.tobytes(), labels.tobytes()), _encode_gray_arrays, (quality, min_side))
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{display_path(root)}: not a folder, and not a dataset spec like "
                                "'fashion-mnist:train'")
    return _scan_folder(root.resolve(), out.resolve(), labels_from_folders, (quality, max_side, min_side))


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
    min_side: int = DEFAULT_MIN_SIDE,
    labels_from_folders: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Pack a folder of images or a dataset spec ("fashion-mnist:train", "mnist:test", ...) into shards in out_dir.

    Resumes an interrupted pack into the same out_dir; returns at once when out_dir already holds the complete pack.
    A different source or different options in the same out_dir raise FileExistsError. Images with a side under
    min_side px, as stored, are skipped (too_small). `progress`: a progress bar and status lines on stderr. Returns
    the manifest (also written to out_dir/manifest.json).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if min_side < 1:
        raise ValueError(f"min_side (--min-side) must be at least 1 px, got {min_side}")
    if max_side is not None and max_side < min_side:
        raise ValueError(f"max_side (--max-side) {max_side} is under min_side (--min-side) {min_side}: every image "
                         "would be too small")
    out = Path(os.fsdecode(out_dir))
    inputs = _read_inputs(source, out, labels_from_folders, jpeg_quality, max_side, min_side)
    out.mkdir(parents=True, exist_ok=True)
    options = {"shard_size": shard_size, "jpeg_quality": jpeg_quality, "max_side": max_side, "min_side": min_side,
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
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_die_with_parent, initargs=(os.getpid(),)) if use_pool else None
    bar = tqdm(total=len(inputs.items), initial=start, disable=not progress, unit="img",
               desc=f"pack {inputs.description}")
    try:
        results = _ordered_map(_PrepareChunk(inputs.prepare, inputs.prepare_args), _chunks(remaining, chunk_size),
                               executor, in_flight=4 * workers)
        position = start
        for chunk_results in results:
            for jpeg, reason, digest in chunk_results:
                if jpeg is not None and digest in kept_source:
                    skipped.append({"path": inputs.name(position), "reason": "duplicate",
                                    "duplicate_of": os.path.join(inputs.description, kept_source[digest])})
                elif jpeg is None:
                    skipped.append({"path": inputs.name(position), "reason": reason})
                else:
                    if digest is not None:
                        kept_source[digest] = inputs.names[position]
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
        "min_side": min_side,
        "jpeg_check": JPEG_CHECK,  # every stored JPEG passed it (kept as is only if so, else re-encoded by Pillow)
    }
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent: int) -> None:
    """Worker initializer: Linux kills this worker when the packer exits, however it exits (kill -9 too). Without it
    a worker waits on the task queue forever, since it holds that queue's write end itself."""
    if not sys.platform.startswith("linux"):
        return  # prctl is Linux's; elsewhere the workers of a killed packer are left to end by hand
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed in a pack worker")
    if os.getppid() != parent:  # the packer died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


class _PrepareChunk:
    """Picklable callable for the worker processes: prepare(chunk, *args)."""

    def __init__(self, prepare: Callable, args: tuple):
        self.prepare, self.args = prepare, args

    def __call__(self, chunk) -> list[Prepared]:
        return self.prepare(chunk, *self.args)

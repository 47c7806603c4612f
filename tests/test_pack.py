"""`seer data pack` on folders: every image format, every skip reason, duplicates, resume after kill -9, DALI
streaming of the result; `seer data tiles` on the real photos of Debian's wallpaper packages."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from dataloading import tiles
from dataloading.pack import JOURNAL, MANIFEST, pack

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- test images
def smooth_rgb(height: int, width: int) -> np.ndarray:
    """Gradients (red grows to the right, green downwards) and a bright block near the top-left corner: any
    flip or rotation shows, and JPEG stores it with small error."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([40 + 180 * x / (width - 1), 30 + 190 * y / (height - 1), 120 + 60 * np.sin(x / 5.0)], -1)
    image[height // 8 : height // 3, width // 8 : width // 3] = (250, 240, 60)
    return image.round().astype(np.uint8)


def smooth_gray(height: int, width: int) -> np.ndarray:
    return smooth_rgb(height, width)[..., 1].copy()


def ramp(height: int, width: int) -> np.ndarray:
    """An alpha channel going from transparent (left) to opaque (right)."""
    return np.linspace(0, 255, width).round().astype(np.uint8)[None, :].repeat(height, 0)


def over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha.astype(float) / 255
    weight = weight[..., None] if color.ndim == 3 else weight
    return (color * weight + 255 * (1 - weight)).round().astype(np.uint8)


def cmyk_of(rgb: np.ndarray) -> np.ndarray:
    """CMYK without black ink, so the RGB a viewer shows is exactly `rgb`."""
    return np.concatenate([255 - rgb, np.zeros_like(rgb[..., :1])], -1)


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt, **params)
    return buffer.getvalue()


def save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: 16-bit RGB (Pillow cannot write it) and headers Pillow would refuse to write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of any size, compressed to almost nothing (a decompression bomb when huge)."""
    return png_bytes(width, height, 1, 0, b"\0" * ((width + 7) // 8 + 1) * height)  # filter byte + packed bits


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


# How a viewer shows stored pixels for each EXIF orientation, and the inverse: how to store a wanted view.
SHOW = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}
STORE = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}
PALETTE = np.array([[0, 0, 0], [250, 30, 30], [30, 200, 40], [40, 60, 230], [240, 240, 240]], np.uint8)
JPEG_VARIANTS = {  # plain 8-bit JPEGs: packed byte for byte
    "a/baseline.jpg": {}, "a/progressive.jpg": {"progressive": True}, "b/444.jpg": {"subsampling": 0},
    "b/422.jpg": {"subsampling": 1}, "b/optimized.jpg": {"optimize": True}, "a/q50.jpg": {"quality": 50},
    "b/restart-markers.jpg": {"restart_marker_rows": 1}, "a/exif-upright.jpg": {"exif": exif_orientation(1)},
}


def pil_view(data: bytes) -> np.ndarray:
    """Pillow's decode of (lossy) file bytes, turned as its EXIF orientation says by numpy, not by Pillow."""
    with Image.open(io.BytesIO(data)) as image:
        orientation = image.getexif().get(0x0112, 1)
        pixels = np.asarray(image.convert("RGB") if image.mode == "CMYK" else image)
    return np.ascontiguousarray(SHOW[orientation](pixels)) if orientation != 1 else pixels


def good_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the pixels a viewer shows: exact for lossless files, Pillow's decode of lossy ones).
    Every image has a size of its own."""
    sizes = iter([(h, w) for h in range(24, 80, 2) for w in (40, 46)])
    images = {}

    def lossy(name, data):
        images[name] = data, pil_view(data)

    for name, params in JPEG_VARIANTS.items():
        lossy(name, encode(smooth_rgb(*next(sizes)), "JPEG", quality=params.pop("quality", 92), **params))
    lossy("a/trailing-bytes.jpg", encode(smooth_rgb(*next(sizes)), "JPEG") + b"maker notes after the end marker")
    lossy("a/gray.jpg", encode(smooth_gray(*next(sizes)), "JPEG", quality=92))
    lossy("b/gray-progressive.jpg", encode(smooth_gray(*next(sizes)), "JPEG", quality=92, progressive=True))
    lossy("b/cmyk.jpg", encode(cmyk_of(smooth_rgb(*next(sizes))), "JPEG", "CMYK", quality=95))
    for orientation in SHOW:
        stored = np.ascontiguousarray(STORE[orientation](smooth_rgb(*next(sizes))))
        lossy(f"b/orientation-{orientation}.jpg", encode(stored, "JPEG", quality=95,
                                                         exif=exif_orientation(orientation)))
    shown = smooth_rgb(*next(sizes))
    images["a/orientation-8.png"] = encode(np.ascontiguousarray(STORE[8](shown)), "PNG",
                                           exif=exif_orientation(8)), shown

    rgb, gray = smooth_rgb(*next(sizes)), smooth_gray(*next(sizes))
    images["a/rgb.png"] = encode(rgb, "PNG"), rgb
    images["a/gray.png"] = encode(gray, "PNG"), gray
    rgb = smooth_rgb(*next(sizes))
    alpha = ramp(*rgb.shape[:2])
    images["a/rgba.png"] = encode(np.dstack([rgb, alpha]), "PNG"), over_white(rgb, alpha)
    gray = smooth_gray(*next(sizes))
    alpha = ramp(*gray.shape)
    images["a/gray-alpha.png"] = encode(np.dstack([gray, alpha]), "PNG", "LA"), over_white(gray, alpha)
    h, w = next(sizes)
    index = (np.add.outer(np.arange(h) // 6, np.arange(w) // 9) % len(PALETTE)).astype(np.uint8)
    paletted = Image.fromarray(index, "P")
    paletted.putpalette(PALETTE.ravel().tolist())
    images["b/palette.png"] = save(paletted, "PNG"), PALETTE[index]
    images["b/palette-transparent.png"] = (save(paletted, "PNG", transparency=0),
                                           np.where((index == 0)[..., None], 255, PALETTE[index]).astype(np.uint8))
    h, w = next(sizes)
    deep = smooth_gray(h, w).astype(np.uint16) * 257 + (np.arange(w, dtype=np.uint16) % 200)
    images["b/gray16.png"] = encode(deep, "PNG"), (deep >> 8).astype(np.uint8)
    images["b/gray16.tiff"] = encode(deep, "TIFF"), (deep >> 8).astype(np.uint8)
    h, w = next(sizes)
    deep_rgb = (smooth_rgb(h, w).astype(np.uint16) * 257).astype(">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in deep_rgb)
    images["b/rgb16.png"] = png_bytes(w, h, 16, 2, rows), (deep_rgb >> 8).astype(np.uint8)
    h, w = next(sizes)
    bits = np.add.outer(np.arange(h) // 8, np.arange(w) // 8) % 2 == 1
    images["b/bilevel.png"] = encode(bits, "PNG"), (bits * 255).astype(np.uint8)

    lossy("a/lossy.webp", encode(smooth_rgb(*next(sizes)), "WEBP", quality=95))
    rgb = smooth_rgb(*next(sizes))
    alpha = ramp(*rgb.shape[:2])
    images["a/alpha-lossless.webp"] = encode(np.dstack([rgb, alpha]), "WEBP", lossless=True), over_white(rgb, alpha)
    if features.check("avif"):
        lossy("a/image.avif", encode(smooth_rgb(*next(sizes)), "AVIF", quality=95))
    rgb, gray = smooth_rgb(*next(sizes)), smooth_gray(*next(sizes))
    images["a/image.bmp"] = encode(rgb, "BMP"), rgb
    images["a/image.pgm"] = encode(gray, "PPM"), gray
    h, w = next(sizes)
    index = (np.add.outer(np.arange(h) // 5, np.arange(w) // 7) % len(PALETTE)).astype(np.uint8)
    first, second = Image.fromarray(index, "P"), Image.fromarray((index + 2) % len(PALETTE), "P")
    for frame in (first, second):
        frame.putpalette(PALETTE.ravel().tolist())
    images["b/animated.gif"] = save(first, "GIF", save_all=True, append_images=[second]), PALETTE[index]
    rgb = smooth_rgb(*next(sizes))
    images["b/rgb.tiff"] = encode(rgb, "TIFF", compression="tiff_lzw"), rgb
    rgb = smooth_rgb(*next(sizes))
    images["b/cmyk.tiff"] = encode(cmyk_of(rgb), "TIFF", "CMYK"), rgb
    rgb = smooth_rgb(*next(sizes))
    images["b/two-pages.tiff"] = save(Image.fromarray(rgb), "TIFF", save_all=True,
                                      append_images=[Image.fromarray(255 - rgb)]), rgb
    # Content and extension disagree: the content decides.
    rgb = smooth_rgb(*next(sizes))
    images["a/png-named.jpg"] = encode(rgb, "PNG"), rgb
    lossy("b/jpeg-named.png", encode(smooth_rgb(*next(sizes)), "JPEG", quality=92))
    rgb = smooth_rgb(*next(sizes))
    images["b/webp-named.gif"] = encode(rgb, "WEBP", lossless=True), rgb
    return images


KEPT_BYTE_FOR_BYTE = [*JPEG_VARIANTS, "a/trailing-bytes.jpg", "a/gray.jpg", "b/gray-progressive.jpg",
                      "b/jpeg-named.png"]


def bad_files(good: dict) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the reason pack must give for skipping it)."""
    cut = {name: good[name][0][: len(good[name][0]) // 2] for name in
           ("a/baseline.jpg", "a/rgb.png", "a/lossy.webp", "b/animated.gif", "b/rgb.tiff")}
    return {
        "a/truncated.jpg": (cut["a/baseline.jpg"], "corrupt"),
        "a/truncated.png": (cut["a/rgb.png"], "corrupt"),
        "b/truncated.webp": (cut["a/lossy.webp"], "corrupt"),
        "b/truncated.gif": (cut["b/animated.gif"], "corrupt"),
        "b/truncated.tiff": (cut["b/rgb.tiff"], "not_an_image"),  # Pillow writes the image directory last
        "a/empty.jpg": (b"", "empty"),
        "a/notes.txt": (b"shopping list: milk, eggs\n", "not_an_image"),
        "b/text.jpg": (b"<html>a web page saved as .jpg</html>", "not_an_image"),
        "b/random.bin": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not_an_image"),
        "b/zero-width.png": (png_bytes(0, 8, 8, 0, b""), "not_an_image"),  # Pillow refuses a 0-pixel header
        "a/bomb.png": (blank_png(9500, 9500), "too_many_pixels"),  # 90 Mpx: Pillow itself only warns
        "b/bomb-huge.png": (blank_png(14000, 14000), "too_many_pixels"),  # 196 Mpx: Pillow refuses it at open
        "a/strip.png": (blank_png(3000, 2), "extreme_aspect_ratio"),
        "b/panorama.png": (blank_png(33000, 700), "side_too_long"),  # DALI's crop crashes past 32,768 px
        "a/image.pcx": (encode(smooth_rgb(20, 20), "PCX"), "unsupported_format"),
        "b/float.tiff": (encode(np.ones((20, 20), np.float32), "TIFF"), "unsupported_mode"),
        "stray.jpg": (good["a/baseline.jpg"][0], "outside_class_folder"),
    }


# Exact copies: pack keeps one file of each group.
DUPLICATES = {"b/baseline-copy.jpg": "a/baseline.jpg", "a/gray-copy.png": "a/gray.png",
              "b/gray-copy-2.png": "a/gray.png"}


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def read_samples(out: Path) -> list[dict]:
    """Every sample of a pack in key order: {"key", "jpg", "cls"}."""
    samples = {}
    for shard in json.loads((out / MANIFEST).read_text())["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".")
                samples.setdefault(int(key), {"key": int(key)})[ext] = tar.extractfile(member).read()
    return [samples[k] for k in sorted(samples)]


def journal_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()[1:]]


def packed_sources(out: Path) -> list[str]:
    """The source file of every sample, in key order."""
    return [source for record in journal_records(out) for source in record["sources"]]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of good images in every format, broken and refused files, and exact duplicates, packed once."""
    root = tmp_path_factory.mktemp("mixed")
    good = good_images()
    bad = bad_files(good)
    write_files(root / "src", {name: data for name, (data, _) in good.items()})
    write_files(root / "src", {name: data for name, (data, _) in bad.items()})
    write_files(root / "src", {copy: good[original][0] for copy, original in DUPLICATES.items()})
    manifest = pack(root / "src", root / "out", shard_size=16, workers=1, progress=False)
    return root, good, bad, manifest


# ---------------------------------------------------------------------------------------- formats and reasons
def test_pack_counts_every_skip_reason(mixed):
    root, good, bad, manifest = mixed
    expected = {}
    for _, reason in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["duplicate"] = len(DUPLICATES)
    assert manifest["skipped"] == expected
    by_file = {Path(f["path"]).relative_to(root / "src").as_posix(): f["reason"] for f in manifest["skipped_files"]}
    assert {name: by_file[name] for name in bad} == {name: reason for name, (_, reason) in bad.items()}
    assert manifest["kept"] == len(good) and manifest["classes"] == ["a", "b"]
    assert [s["samples"] for s in manifest["shards"]] == [16, 16, len(good) - 32]
    assert not list((root / "out").glob("*.tmp"))


def test_every_good_image_is_packed_as_a_viewer_shows_it(mixed):
    root, good, _, _ = mixed
    samples, sources = read_samples(root / "out"), packed_sources(root / "out")
    kept = {DUPLICATES.get(name, name) for name in sources}
    assert len(sources) == len(samples) and kept == set(good)
    for sample, source in zip(samples, sources):
        name = DUPLICATES.get(source, source)
        data, shown = good[name]
        assert sample["cls"] == str("ab".index(source[0])).encode(), source  # the class folder it came from
        assert (sample["jpg"] == data) == (name in KEPT_BYTE_FOR_BYTE), name
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG" and image.mode == ("L" if shown.ndim == 2 else "RGB"), name
            assert image.getexif().get(0x0112, 1) == 1, name
            pixels = np.asarray(image).astype(float)
        assert pixels.shape == shown.shape, name  # rotated by its EXIF orientation where it had one
        if name not in KEPT_BYTE_FOR_BYTE:
            # Re-encoded at quality 95 from the shown pixels: what the same encoder makes of them, up to rounding.
            expected = np.asarray(Image.open(io.BytesIO(encode(shown, "JPEG", quality=95))))
            error = np.abs(pixels - expected).mean()
            assert error < 0.5, (name, error)  # a wrong flip, rotation or conversion costs tens of levels here


def test_duplicates_are_packed_once_and_the_same_copy_every_time(mixed):
    root, _, _, manifest = mixed
    sources = packed_sources(root / "out")
    skipped = {Path(f["path"]).relative_to(root / "src").as_posix(): f for f in manifest["skipped_files"]}
    groups = {}
    for copy, original in DUPLICATES.items():
        groups.setdefault(original, {original}).add(copy)
    for group in groups.values():
        kept = [name for name in group if name in sources]
        assert len(kept) == 1, group
        for name in group - set(kept):
            assert skipped[name]["reason"] == "duplicate"
            assert skipped[name]["duplicate_of"] == str(root / "src" / kept[0])
    # The copy kept is the first in the pack order, which is fixed (seeded): packing again keeps the same copies.
    assert pack(root / "src", root / "again", shard_size=16, workers=1, progress=False) == manifest
    assert packed_sources(root / "again") == sources


def test_max_side_downscales_and_no_labels_packs_every_folder(tmp_path):
    write_files(tmp_path / "src", {"a/wide.png": encode(smooth_rgb(200, 300), "PNG"),
                                   "b/wide.jpg": encode(smooth_rgb(200, 300), "JPEG"),
                                   "top.png": encode(smooth_rgb(20, 30), "PNG")})
    manifest = pack(tmp_path / "src", tmp_path / "out", max_side=64, progress=False, workers=1)
    assert manifest["kept"] == 2 and manifest["skipped"] == {"outside_class_folder": 1}
    assert sorted(Image.open(io.BytesIO(s["jpg"])).size for s in read_samples(tmp_path / "out")) == [(64, 43)] * 2
    manifest = pack(tmp_path / "src", tmp_path / "flat", labels_from_folders=False, progress=False, workers=1)
    assert manifest["kept"] == 3 and manifest["classes"] is None
    assert all("cls" not in s for s in read_samples(tmp_path / "flat"))


# -------------------------------------------------------------------------------------------- DALI streaming
STREAM = textwrap.dedent("""
    import json, sys
    import torch
    from dataloading.config import CropGroup, DataConfig
    from dataloading.eval import build_eval_loader
    from dataloading.multicrop import build_train_loader

    shards, unlabelled = sys.argv[1:]
    crops = [CropGroup(size=32, count=2, scale=(0.3, 1.0)), CropGroup(size=16, count=2, scale=(0.1, 0.3))]
    loader = build_train_loader(DataConfig(train_shards=shards, crops=crops), batch_size=32)
    shapes, labels = [], set()
    for _ in range(4):
        batch = next(loader)
        assert all(torch.isfinite(crop).all() for crop in batch["crops"])
        shapes.append([list(crop.shape) for crop in batch["crops"]])
        labels |= set(batch["label"].tolist())
    seen = []
    stats = DataConfig(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    for batch in build_eval_loader(stats, shards, size=24, batch_size=32, with_index=True):
        assert torch.isfinite(batch["image"]).all()
        seen += batch["index"].tolist()
    no_labels = next(build_train_loader(DataConfig(train_shards=unlabelled, crops=crops), batch_size=32))["label"]
    print(json.dumps({"shapes": shapes, "labels": sorted(labels), "seen": seen, "no_labels": no_labels.tolist()}))
""")


def test_dali_streams_every_packed_format(mixed):
    """In a subprocess: a DALI crash on a bad file is a segfault at batch >= 32, which must fail this test only."""
    root, good, _, _ = mixed
    pack(root / "src", root / "unlabelled", labels_from_folders=False, workers=1, progress=False)
    run = subprocess.run([sys.executable, "-c", STREAM, str(root / "out"), str(root / "unlabelled")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [[[32, 3, 32, 32]] * 2 + [[32, 3, 16, 16]] * 2] * 4
    assert result["labels"] == [0, 1]
    assert sorted(result["seen"]) == list(range(len(good)))
    assert result["no_labels"] == [-1] * 32


# ---------------------------------------------------------------------------------------------------- resume
def noisy_folder(root: Path, count: int) -> None:
    """`count` noise BMPs (quick to write, slow to re-encode as JPEG) so a pack can be killed midway, plus exact
    copies of some of them spread over the pack order (so duplicates are also found across the resume point)."""
    rng = np.random.default_rng(1)
    files = {}
    for i in range(count):
        files[f"{'ab'[i % 2]}/{i:04d}.bmp"] = encode(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8), "BMP")
    for i in range(0, count, 25):
        files[f"b/copy-{i:04d}.bmp"] = files[f"{'ab'[i % 2]}/{i:04d}.bmp"]
    files["a/broken.bmp"] = files["a/0000.bmp"][:5000]
    write_files(root, files)


def test_resume_after_kill_9_writes_the_same_pack(tmp_path, capsys):
    noisy_folder(tmp_path / "src", 500)
    reference = pack(tmp_path / "src", tmp_path / "reference", shard_size=40, workers=1, progress=False)
    assert reference["skipped"] == {"duplicate": 20, "corrupt": 1} and len(reference["shards"]) == 13

    out = tmp_path / "out"
    script = f"from dataloading.pack import pack; pack({str(tmp_path / 'src')!r}, {str(out)!r}, shard_size=40, " \
             "workers=2, progress=False)"
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        journal = out / JOURNAL
        # Two complete shards (after the header line) and the third one half written.
        if journal.exists() and journal.read_text().count("\n") >= 3 and any(out.glob("*.tar.tmp")):
            break
        time.sleep(0.005)
    os.killpg(child.pid, signal.SIGKILL)  # the packer and its worker processes
    child.wait()
    assert not (out / MANIFEST).exists(), "the pack finished before it was killed: give it more work"
    done = journal_records(out)
    assert 2 <= len(done) < len(reference["shards"]) and list(out.glob("*.tar.tmp"))
    for tar in out.glob("shard-*.tar"):  # whatever is visible is complete: a tar with its index
        with tarfile.open(tar) as archive:
            count = int(tar.with_suffix(".idx").read_text().split()[1])
            assert len(archive.getnames()) == 2 * count
    with open(out / JOURNAL, "ab") as journal:
        journal.write(b'{"tar":"shard-0000')  # and a line torn by a crash while it was written

    resumed = pack(tmp_path / "src", out, shard_size=40, workers=2)
    assert f"resuming {out} after {len(done)} complete shards" in capsys.readouterr().err
    assert resumed == reference
    for name in sorted(os.listdir(tmp_path / "reference")):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "reference"))


def test_rerun_is_a_no_op_and_another_pack_is_refused(tmp_path, capsys):
    write_files(tmp_path / "src", {f"a/{i}.png": encode(smooth_rgb(20 + i, 30), "PNG") for i in range(5)})
    first = pack(tmp_path / "src", tmp_path / "out", shard_size=2, workers=1, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert pack(tmp_path / "src", tmp_path / "out", shard_size=2, workers=2) == first
    assert "already holds the complete pack" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps

    with pytest.raises(FileExistsError, match=re.escape("shard_size=2 there, 3 asked")):
        pack(tmp_path / "src", tmp_path / "out", shard_size=3, progress=False)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="holds another pack .*source="):
        pack(tmp_path / "other", tmp_path / "out", shard_size=2, progress=False)
    (tmp_path / "src" / "a" / "new.png").write_bytes(encode(smooth_rgb(9, 9), "PNG"))
    with pytest.raises(FileExistsError, match="changed since .* was packed from it .5 inputs then, 6 now"):
        pack(tmp_path / "src", tmp_path / "out", shard_size=2, progress=False)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MANIFEST).write_text("{}")  # a pack without a journal
    with pytest.raises(FileExistsError, match=f"no {JOURNAL}"):
        pack(tmp_path / "src", tmp_path / "old", progress=False)


def test_out_inside_src_is_not_an_input(tmp_path):
    write_files(tmp_path, {f"a/{i}.png": encode(smooth_rgb(20 + i, 30), "PNG") for i in range(3)})
    first = pack(tmp_path, tmp_path / "a" / "shards", workers=1, progress=False)
    assert first["kept"] == 3 and first["skipped"] == {}
    assert pack(tmp_path, tmp_path / "a" / "shards", workers=1, progress=False) == first  # no "SRC changed"


def test_a_deleted_shard_is_packed_again(tmp_path):
    write_files(tmp_path / "src", {f"a/{i}.png": encode(smooth_rgb(20 + i, 30), "PNG") for i in range(5)})
    first = pack(tmp_path / "src", tmp_path / "out", shard_size=2, workers=1, progress=False)
    shard = (tmp_path / "out" / "shard-000001.tar").read_bytes()
    (tmp_path / "out" / "shard-000001.tar").unlink()
    assert pack(tmp_path / "src", tmp_path / "out", shard_size=2, workers=1, progress=False) == first
    assert (tmp_path / "out" / "shard-000001.tar").read_bytes() == shard


# ----------------------------------------------------------------------------------------------------- tiles
def test_setup_script_installs_the_photo_packages_tiles_needs():
    script = (REPO / "scripts" / "setup.sh").read_text()
    listed = re.search(r'^PHOTO_PACKAGES="([^"]*)"', script, re.M).group(1).split()
    assert tuple(listed) == tiles.PHOTO_PACKAGES
    assert "--photos" in (REPO / "Makefile").read_text()


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian-based system")
def test_missing_photo_packages_name_the_apt_command():
    with pytest.raises(FileNotFoundError, match=re.escape(
            "apt-get install -y --no-install-recommends no-such-wallpapers` (or `make photos`)")):
        tiles.find_photos(("no-such-wallpapers",))


def test_parse_size():
    assert tiles.parse_size("500x375") == (500, 375)
    for bad in ("500", "500x", "0x10", "ax3"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            tiles.parse_size(bad)


@pytest.fixture(scope="module")
def photos():
    try:
        return tiles.find_photos()
    except FileNotFoundError as missing:
        pytest.skip(f"real photos not installed (`make photos`): {missing}")


def test_tiles_from_real_photos_are_deterministic(photos, tmp_path):
    assert len(photos) >= 30  # ~40 photographs in these packages; renders and previews left out
    few = sorted(photos, key=lambda p: Image.open(p).size[0])[:3]  # each run decodes them: the smallest ones
    summary = tiles.make_tiles(tmp_path / "one", 7, size=(64, 48), seed=0, workers=1, photos=few)
    assert summary["tiles"] == 7 and summary["photos"] == 3
    tiles.make_tiles(tmp_path / "two", 7, size=(64, 48), seed=0, workers=2, photos=few)
    tiles.make_tiles(tmp_path / "other", 7, size=(64, 48), seed=1, workers=1, photos=few)
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == [f"tile-{i:06d}.jpg" for i in range(7)]
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)
    assert all((tmp_path / "one" / n).read_bytes() != (tmp_path / "other" / n).read_bytes() for n in names)
    assert len({(tmp_path / "one" / n).read_bytes() for n in names}) == 7  # 2-3 tiles per photo, all different
    for name in names:
        with Image.open(tmp_path / "one" / name) as tile:
            assert (tile.format, tile.mode, tile.size) == ("JPEG", "RGB", (64, 48))
            assert np.asarray(tile).std() > 2  # a real picture, not a flat fill
    with pytest.raises(FileExistsError, match="not empty"):
        tiles.make_tiles(tmp_path / "one", 2, photos=few)

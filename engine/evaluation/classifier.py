"""A backbone with a linear classifier on top, saved in one file with everything needed to use it.

`seer finetune` trains one end to end, `seer eval linear --save-head` fits the head on frozen features, and
`seer predict` loads either. The file records how images were preprocessed, so predictions see the same inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.backbone import build_backbone

FORMAT = "seer-classifier/1"


class Classifier(nn.Module):
    """images -> logits: backbone features, optionally L2-normalized then standardized, then one linear layer.

    `normalize_features` with `feature_mean`/`feature_std` reproduces a linear probe fitted on the normalized,
    standardized features of `engine.evaluation.evaluate`; a fine-tuned model uses the raw pooled features.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, normalize_features: bool = False,
                 feature_mean: torch.Tensor | None = None, feature_std: torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        dim = backbone.num_features
        self.head = nn.Linear(dim, num_classes)
        self.normalize_features = normalize_features
        self.register_buffer("feature_mean", torch.zeros(dim) if feature_mean is None else feature_mean.float().clone())
        self.register_buffer("feature_std", torch.ones(dim) if feature_std is None else feature_std.float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images).float()
        if self.normalize_features:
            features = F.normalize(features, dim=1)
        return self.head((features - self.feature_mean) / self.feature_std)


def save_classifier(path: str | Path, classifier: Classifier, *, backbone_name: str, in_chans: int, image_size: int,
                    mean: list[float], std: list[float], class_names: list[str] | None, source: str) -> Path:
    """Write `classifier` and its preprocessing (images resized to image_size², then (x/255 - mean) / std).

    `source` says how the head was obtained (e.g. "linear_probe", "finetune"); class_names may be None (indices).
    """
    num_classes = classifier.head.out_features
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a head with {num_classes} outputs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
    torch.save({
        "format": FORMAT, "source": source, "backbone": backbone_name, "in_chans": in_chans,
        "num_classes": num_classes, "normalize_features": classifier.normalize_features,
        "image_size": image_size, "mean": list(mean), "std": list(std), "class_names": class_names,
        "state_dict": state,
    }, path)
    return path


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """The Classifier saved at `path` (eval mode, on `device`) and its metadata (preprocessing, class names...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file not found: {path}")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a classifier saved by seer (expected format {FORMAT!r}); "
                         f"backbone-only files (backbone_final.pt) need `seer eval linear --save-head` or `seer finetune`")
    backbone = build_backbone(saved["backbone"], in_chans=saved["in_chans"])
    classifier = Classifier(backbone, saved["num_classes"], normalize_features=saved["normalize_features"])
    classifier.load_state_dict(saved["state_dict"])
    meta = {k: v for k, v in saved.items() if k != "state_dict"}
    return classifier.to(device).eval(), meta

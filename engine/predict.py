"""Recognition with a saved classifier, and saving a linear probe as one.

    seer eval linear --weights W --save-head HEAD.pt [section.key=value ...]
    seer predict --model HEAD.pt IMAGE_OR_FOLDER... [--top-k 5] [--json]
"""
from __future__ import annotations

from pathlib import Path

import torch

from dataloading.pipeline import image_file_batches, read_manifest
from engine.classifier import Classifier, load_classifier, save_classifier
from engine.evaluate import FeatureCache, split_features
from engine.export import load_weights_into, read_weights
from engine.models import build_backbone
from engine.probes import fit_linear_probe


def save_linear_head(weights_path: str | Path, cfg, out: str | Path, image_size: int | None = None) -> dict:
    """Fit the linear probe of `seer eval linear` on the frozen features of cfg.eval.train_shards and save it,
    with the backbone at `weights_path`, as a Classifier file (engine.classifier). Returns the probe's test
    top-1 on cfg.eval.test_shards, the `linear_top1` of `seer eval linear`."""
    weights = read_weights(weights_path)
    if weights.name is None:
        raise ValueError(f"{weights_path} does not say which backbone it holds: use a backbone_*.pt file of "
                         f"pretraining or a file written by `seer export`")
    if weights.in_chans != cfg.data.channels:
        raise ValueError(f"data.channels={cfg.data.channels} but the backbone in {weights_path} takes "
                         f"{weights.in_chans} channel(s)")
    classes = read_manifest(cfg.eval.train_shards)[0]["classes"]
    test_classes = read_manifest(cfg.eval.test_shards)[0]["classes"]
    if not classes:
        raise ValueError(f"eval.train_shards={cfg.eval.train_shards} has no labels: a classifier needs shards "
                         f"packed with labels (class folders or a dataset)")
    if test_classes != classes:
        raise ValueError(f"eval.test_shards={cfg.eval.test_shards} has classes {test_classes}, "
                         f"eval.train_shards has {classes}: pack both with the same class folders")
    backbone = build_backbone(weights.name, in_chans=weights.in_chans)
    load_weights_into(backbone, weights, f"backbone {weights.name} (in_chans={weights.in_chans})")
    backbone.eval()
    size = image_size or cfg.eval.image_size
    features = split_features(backbone, cfg, image_size=size, cache=FeatureCache.beside(weights_path))
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    probe = fit_linear_probe(train_x, train_y, len(classes))
    classifier = Classifier(backbone, len(classes), normalize_features=True, feature_mean=probe.mean,
                            feature_std=probe.std)
    classifier.head.load_state_dict(probe.classifier.state_dict())
    save_classifier(out, classifier, backbone_name=weights.name, in_chans=weights.in_chans, image_size=size,
                    mean=cfg.data.mean, std=cfg.data.std, class_names=classes, source="linear_probe")
    return {"linear_top1": probe.accuracy(test_x, test_y)}


def image_files(inputs: list[str | Path]) -> list[Path]:
    """The files named, and every file under the folders named (sorted), in the order given."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file())
            if not found:
                raise FileNotFoundError(f"{item} is an empty folder: no images to classify")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"image not found: {item}")
    return files


@torch.no_grad()
def predict(model_path: str | Path, inputs: list[str | Path], top_k: int = 5, batch_size: int = 64) -> list[dict]:
    """For each image file (folders: every file under them), the top_k classes of the classifier saved at
    `model_path`, most probable first: [{"file", "top": [{"class", "index", "probability"}, ...]}, ...]."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    classifier, meta = load_classifier(model_path)
    names = meta["class_names"] or [str(i) for i in range(meta["num_classes"])]
    files = image_files(inputs)
    batches = image_file_batches(files, size=meta["image_size"], channels=meta["in_chans"], mean=meta["mean"],
                                 std=meta["std"], batch_size=batch_size)
    results = []
    for start, images in zip(range(0, len(files), batch_size), batches):
        top = classifier(images).softmax(dim=1).topk(min(top_k, len(names)), dim=1)
        for file, probabilities, indices in zip(files[start:], top.values.tolist(), top.indices.tolist()):
            results.append({"file": str(file), "top": [{"class": names[i], "index": i, "probability": p}
                                                       for p, i in zip(probabilities, indices)]})
    return results

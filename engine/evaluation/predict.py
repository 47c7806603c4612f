"""Recognition with a saved classifier, and saving a linear probe as one.

    seer eval linear --weights W --save-head HEAD.pt [section.key=value ...]
    seer predict --model HEAD.pt IMAGE_OR_FOLDER... [--top-k 5] [--json]
"""
from __future__ import annotations

from pathlib import Path

import torch

from dataloading.config import DataConfig
from dataloading.eval import image_file_batches
from dataloading.pack import display_path
from dataloading.shards import matching_class_names
from engine.evaluation.classifier import Classifier, load_classifier, save_classifier
from engine.evaluation.evaluate import FeatureCache, split_features
from engine.evaluation.probes import fit_linear_probe
from engine.models.weights import backbone_from_weights, read_weights


def save_linear_head(weights_path: str | Path, cfg, out: str | Path, image_size: int | None = None) -> dict:
    """Fit the linear probe of `seer eval linear` on the frozen features of cfg.eval.train_shards and save it,
    with the backbone at `weights_path`, as a Classifier file (engine.evaluation.classifier). Returns the probe's test
    top-1 on cfg.eval.test_shards, the `linear_top1` of `seer eval linear`."""
    backbone, name = backbone_from_weights(read_weights(weights_path), channels=cfg.data.channels)
    backbone.eval()
    classes = matching_class_names(cfg.eval.train_shards, cfg.eval.test_shards, "eval.train_shards",
                                   "eval.test_shards")
    size = image_size or cfg.eval.image_size
    features = split_features(backbone, cfg, image_size=size, cache=FeatureCache.beside(weights_path))
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    probe = fit_linear_probe(train_x, train_y, len(classes))
    classifier = Classifier(backbone, len(classes), normalize_features=True, feature_mean=probe.mean,
                            feature_std=probe.std)
    classifier.head.load_state_dict(probe.classifier.state_dict())
    save_classifier(out, classifier, backbone_name=name, in_chans=cfg.data.channels, image_size=size,
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
    preprocessing = DataConfig(channels=meta["in_chans"], mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    batches = image_file_batches(files, preprocessing, size=meta["image_size"], batch_size=batch_size)
    results = []
    for start, images in zip(range(0, len(files), batch_size), batches):
        top = classifier(images).softmax(dim=1).topk(min(top_k, len(names)), dim=1)
        for file, probabilities, indices in zip(files[start:], top.values.tolist(), top.indices.tolist()):
            results.append({"file": display_path(file), "top": [{"class": names[i], "index": i, "probability": p}
                                                       for p, i in zip(probabilities, indices)]})
    return results

"""The demo: Fashion-MNIST -> shards -> SwAV pretraining of a small RegNetY -> evaluation of frozen features.

Compares the pretrained backbone with the same backbone at the weights the run started from, and with raw pixels,
on Fashion-MNIST and, as a transfer task the backbone never saw, on MNIST.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from dataloading.pack import pack
from engine.config import load_config
from engine.evaluation.evaluate import evaluate
from engine.models.weights import load_backbone_weights
from engine.training.metrics import plot_loss, run_records, uniform_loss
from engine.training.pretrain import pretrain

SOURCE_SIZE = 28  # Fashion-MNIST images are 28x28: raw-pixel kNN uses them as they are


def ensure_packed(source: str, out_dir: str) -> float:
    """Pack `source` into `out_dir` unless a previous run already did; returns the seconds spent."""
    if (Path(out_dir) / "manifest.json").is_file():
        return 0.0
    start = time.perf_counter()
    manifest = pack(source, out_dir)
    print(f"packed {source}: {manifest['kept']} images into {out_dir}")
    return time.perf_counter() - start


def run_demo(overrides: list[str] = ()) -> dict:
    cfg = load_config("demo", overrides)
    run_dir = Path(cfg.train.output_dir).parent
    mnist = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, train_shards=str(Path(cfg.eval.train_shards).parent / "mnist-train"),
        test_shards=str(Path(cfg.eval.test_shards).parent / "mnist-test")))
    pack_seconds = ensure_packed("fashion-mnist:train", cfg.data.train_shards)
    if cfg.eval.train_shards != cfg.data.train_shards:
        pack_seconds += ensure_packed("fashion-mnist:train", cfg.eval.train_shards)
    pack_seconds += ensure_packed("fashion-mnist:test", cfg.eval.test_shards)
    pack_seconds += ensure_packed("mnist:train", mnist.eval.train_shards)
    pack_seconds += ensure_packed("mnist:test", mnist.eval.test_shards)
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # the demo always starts from scratch

    start = time.perf_counter()
    pretrain(cfg)
    pretrain_seconds = time.perf_counter() - start
    out = Path(cfg.train.output_dir)
    accuracy = {}
    backbones = (("pretrained", load_backbone_weights(out / "backbone_final.pt")),
                 ("random", load_backbone_weights(out / "backbone_init.pt")), ("pixels", None))
    for prefix, eval_cfg in (("", cfg), ("mnist_", mnist)):
        for weights, backbone in backbones:
            protocols = ("knn",) if backbone is None else ("knn", "linear", "lowshot")
            results = evaluate(backbone, eval_cfg, protocols, image_size=SOURCE_SIZE if backbone is None else None)
            accuracy.update({f"{prefix}{name}_{weights}": value for name, value in results.items()})
    wall_seconds = time.perf_counter() - start

    records = run_records(out / "metrics.jsonl")
    losses = [r["loss"] for r in records]
    results = {
        **accuracy,
        "final_loss": losses[-1],
        "first_loss": losses[0],
        "ln_k": uniform_loss(cfg.prototype_heads),
        "wall_seconds": wall_seconds,
        "pretrain_seconds": pretrain_seconds,
        "pack_seconds": pack_seconds,
        "steps": cfg.train.steps,
        "images_seen": cfg.train.steps * cfg.train.batch_size,
        "torch_threads": torch.get_num_threads(),
        "config": str(out / "config.yaml"),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_loss(records, run_dir / "loss_curve.png", cfg.prototype_heads)
    print_summary(results, run_dir)
    return results


def print_summary(results: dict, run_dir: Path) -> None:
    print(f"\nSwAV demo on Fashion-MNIST ({results['steps']} steps, {results['images_seen']:,} images, "
          f"{results['wall_seconds']:.0f} s pretrain + eval)")
    print(f"  SwAV loss        {results['first_loss']:.3f} -> {results['final_loss']:.3f}   (ln K = {results['ln_k']:.3f})")
    for prefix, title in (("", "Fashion-MNIST (pretraining data)"), ("mnist_", "MNIST (transfer, never seen)")):
        print(f"  top-1 on {title:<34} kNN k=20  kNN k=200   linear   1% labels   10% labels")
        for weights, label in (("pretrained", "pretrained backbone"), ("random", "same backbone at init"),
                               ("pixels", "raw pixels")):
            cells = [results.get(f"{prefix}{name}_{weights}")
                     for name in ("knn_top1", "knn_top1_k200", "linear_top1", "lowshot1_top1", "lowshot10_top1")]
            print(f"    {label:<40}" + "".join(f"{'' if v is None else f'{v:.2%}':>10}" for v in cells))
    print(f"  results: {run_dir / 'results.json'}   loss curve: {run_dir / 'loss_curve.png'}")

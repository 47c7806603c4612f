"""The demo: Fashion-MNIST -> shards -> SwAV pretraining of a small RegNetY -> kNN of frozen features.

Compares the pretrained backbone with the same backbone at the weights the run started from, and with raw pixels.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from dataloading.pack import pack
from engine.config import DEMO_CONFIG, load_config
from engine.evaluate import evaluate, load_backbone
from engine.metrics import plot_loss, read_metrics
from engine.pretrain import pretrain

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
    cfg = load_config(DEMO_CONFIG, overrides)
    run_dir = Path(cfg.train.output_dir).parent
    pack_seconds = ensure_packed("fashion-mnist:train", cfg.data.train_shards)
    if cfg.eval.train_shards != cfg.data.train_shards:
        pack_seconds += ensure_packed("fashion-mnist:train", cfg.eval.train_shards)
    pack_seconds += ensure_packed("fashion-mnist:test", cfg.eval.test_shards)
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # the demo always starts from scratch

    start = time.perf_counter()
    pretrain(cfg)
    pretrain_seconds = time.perf_counter() - start
    out = Path(cfg.train.output_dir)
    pretrained = evaluate(load_backbone(out / "backbone_final.pt"), cfg, ("knn", "linear", "lowshot"))
    random_init = evaluate(load_backbone(out / "backbone_init.pt"), cfg, ("knn", "linear"))
    pixels = evaluate(None, cfg, ("knn",), image_size=SOURCE_SIZE)
    accuracy = {
        **{f"{name}_pretrained": value for name, value in pretrained.items()},
        **{f"{name}_random": value for name, value in random_init.items()},
        "knn_top1_pixels": pixels["knn_top1"],
    }
    wall_seconds = time.perf_counter() - start

    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    results = {
        **accuracy,
        "final_loss": losses[-1],
        "first_loss": losses[0],
        "ln_k": math.log(cfg.model.num_prototypes),
        "wall_seconds": wall_seconds,
        "pretrain_seconds": pretrain_seconds,
        "pack_seconds": pack_seconds,
        "steps": cfg.train.steps,
        "images_seen": cfg.train.steps * cfg.train.batch_size,
        "torch_threads": torch.get_num_threads(),
        "config": str(out / "config.yaml"),
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_loss(out / "metrics.jsonl", run_dir / "loss_curve.png", cfg.model.num_prototypes)
    print_summary(results, run_dir)
    return results


def print_summary(results: dict, run_dir: Path) -> None:
    print(f"\nSwAV demo on Fashion-MNIST ({results['steps']} steps, {results['images_seen']:,} images, "
          f"{results['wall_seconds']:.0f} s pretrain + eval)")
    print(f"  SwAV loss        {results['first_loss']:.3f} -> {results['final_loss']:.3f}   (ln K = {results['ln_k']:.3f})")
    print("  top-1 on the 10k test images     kNN (k=20)   linear    1% labels   10% labels")
    print(f"    pretrained backbone           {results['knn_top1_pretrained']:8.2%}   {results['linear_top1_pretrained']:7.2%}"
          f"   {results['lowshot1_top1_pretrained']:8.2%}   {results['lowshot10_top1_pretrained']:9.2%}")
    print(f"    same backbone at init         {results['knn_top1_random']:8.2%}   {results['linear_top1_random']:7.2%}")
    print(f"    raw pixels                    {results['knn_top1_pixels']:8.2%}")
    print(f"  results: {run_dir / 'results.json'}   loss curve: {run_dir / 'loss_curve.png'}")

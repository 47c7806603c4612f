"""Supervised fine-tuning: a backbone and a linear classifier trained end to end on labelled shards, then top-1 on
the test split (SEER's headline ImageNet number is a fine-tuned one). The same backbone can start from a
pretrained file or from random weights, for a comparison at the same budget.

    seer finetune --weights RUN/backbone_final.pt|random [--config FILE] [section.key=value ...]
    deepspeed --num_gpus N --module engine.training.finetune --weights ... [--config FILE] [section.key=value ...]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from dataloading.eval import build_eval_loader
from dataloading.shards import matching_class_names
from dataloading.supervised import build_supervised_loader
from engine.evaluation.classifier import Classifier, save_classifier
from engine.config import Config, ConfigError, OptimConfig, load_config
from engine.distributed import DistInfo, all_reduce_mean, init_distributed, launched_arguments, run_rank_and_exit
from engine.models.weights import backbone_from_weights, read_weights
from engine.training.metrics import MetricsWriter
from engine.models.backbone import build_backbone
from engine.training.optim import build_optimizer, lr_schedule
from engine.training.pretrain import autocast, deepspeed_config, git_commit, nchw_reason

CLASSIFIER_FILE = "classifier.pt"


def _classes(ft) -> list[str]:
    """The class names of finetune.train_shards, which finetune.test_shards must share."""
    for key in ("train_shards", "test_shards"):
        if not getattr(ft, key):
            raise ConfigError(f"finetune.{key} is not set: give it a folder of labelled shards (`seer data pack`)")
    try:
        return matching_class_names(ft.train_shards, ft.test_shards, "finetune.train_shards", "finetune.test_shards")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None


class Finetuner:
    def __init__(self, cfg: Config, weights: str):
        self.cfg, self.weights, ft = cfg, weights, cfg.finetune
        self.classes = _classes(ft)
        self.output_dir = Path(ft.output_dir)
        if (self.output_dir / "metrics.jsonl").exists():
            raise FileExistsError(f"{self.output_dir} already holds a fine-tuning run: set finetune.output_dir "
                                  "to a new folder")
        self.dist: DistInfo = init_distributed()
        torch.manual_seed(ft.seed)
        backbone, self.backbone_name = self._backbone(weights)
        torch.manual_seed(ft.seed)  # the head starts the same whichever way the backbone was obtained
        model = Classifier(backbone, len(self.classes)).to(self.dist.device).train()
        optimizer = build_optimizer(model, OptimConfig(name="sgd", momentum=ft.momentum, weight_decay=ft.weight_decay))
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer,
            config=deepspeed_config(batch_size=ft.batch_size, world_size=self.dist.world_size,
                                    zero_stage=ft.zero_stage, gradient_clipping=0.0, precision=ft.precision),
        )
        self.model = self.engine.module
        # As in pretraining: NHWC only where it can be applied, converted after initialize.
        channels_last = cfg.model.channels_last and nchw_reason(ft.zero_stage, ft.precision, self.dist.device) is None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=self.memory_format)
        global_batch = ft.batch_size * self.dist.world_size
        self.lr = lr_schedule(ft.steps, ft.lr * global_batch / 256, ft.warmup_steps, final_fraction=0.0)
        self.loader = build_supervised_loader(
            cfg.data, ft.train_shards, size=ft.image_size, scale=ft.crop_scale, batch_size=ft.batch_size,
            seed=ft.seed, shard_id=self.dist.rank, num_shards=self.dist.world_size, device=self.dist.device,
        )
        self.step = 0
        self.classifier: Classifier | None = None  # the trained model as a plain module, after train()
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(
                yaml.safe_dump({**cfg.to_dict(), "weights": weights, "git_commit": git_commit()}))
        self.metrics = MetricsWriter(self.output_dir, enabled=self.dist.is_main)

    def _backbone(self, weights: str) -> tuple[torch.nn.Module, str]:
        """The backbone to start from and its name: random weights of model.backbone, or a weights file
        (backbone_*.pt of pretraining, or .safetensors; one without seer metadata is taken as model.backbone)."""
        channels = self.cfg.data.channels
        if weights == "random":
            return build_backbone(self.cfg.model.backbone, in_chans=channels), self.cfg.model.backbone
        try:
            return backbone_from_weights(read_weights(weights), channels=channels,
                                         default_name=self.cfg.model.backbone, label="--weights")
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def train(self) -> dict:
        ft = self.cfg.finetune
        bar = tqdm(total=ft.steps, desc="finetune", disable=not (self.dist.is_main and ft.progress),
                   dynamic_ncols=True)
        zero = torch.zeros((), device=self.dist.device)
        window_loss, window_correct, window_steps = zero.clone(), zero.clone(), 0
        window_start, data_time, record = time.perf_counter(), 0.0, {}
        while self.step < ft.steps:
            fetch_start = time.perf_counter()
            batch = next(self.loader)
            data_time += time.perf_counter() - fetch_start
            loss, correct = self.train_step(batch["image"], batch["label"])
            self.step += 1
            window_loss += loss
            window_correct += correct
            window_steps += 1
            bar.update(1)
            if self.step % ft.log_every == 0 or self.step == ft.steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "loss": all_reduce_mean(window_loss / window_steps).item(),
                    "train_top1": all_reduce_mean(window_correct / (window_steps * ft.batch_size)).item(),
                    "lr": self.lr[self.step - 1],
                    "img_per_s": window_steps * ft.batch_size * self.dist.world_size / elapsed,
                    "data_time_share": data_time / elapsed,
                    "epoch": self.loader.epoch,
                }
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss is {record['loss']} at step {self.step}; see {self.metrics.path}")
                self.metrics.write(self.step, **record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['train_top1']:.3f}")
                window_loss, window_correct, window_steps = zero.clone(), zero.clone(), 0
                window_start, data_time = time.perf_counter(), 0.0
        bar.close()
        self.classifier = self.full_classifier()
        top1 = self.top1_on_test(self.classifier)
        self.metrics.write(self.step, test_top1=top1)
        path = self.output_dir / CLASSIFIER_FILE
        if self.dist.is_main:
            data = self.cfg.data
            save_classifier(path, self.classifier, backbone_name=self.backbone_name, in_chans=data.channels,
                            image_size=ft.image_size, mean=data.mean, std=data.std, class_names=self.classes,
                            source="finetune")
        return {"top1": top1, "weights": self.weights, "steps": self.step, "train_loss": record["loss"],
                "train_top1": record["train_top1"], "classifier": str(path), "output_dir": str(self.output_dir)}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the loss and the number of correctly classified images (detached)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr[self.step]
        with autocast(self.cfg.finetune.precision, self.dist.device):
            logits = self.engine(images.contiguous(memory_format=self.memory_format))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.finetune.label_smoothing)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach(), (logits.detach().argmax(1) == labels).sum()

    def full_classifier(self) -> Classifier:
        """A plain fp32 copy of the trained model on every rank (ZeRO-3 gathers its partitions), in eval mode."""
        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.finetune.zero_stage == 3):
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        classifier = Classifier(build_backbone(self.backbone_name, in_chans=self.cfg.data.channels), len(self.classes))
        classifier.load_state_dict(state)
        return classifier.to(self.dist.device).eval()

    def top1_on_test(self, classifier: Classifier) -> float:
        """Top-1 on finetune.test_shards; each rank classifies its part, the counts are summed over ranks."""
        ft = self.cfg.finetune
        loader = build_eval_loader(
            self.cfg.data, ft.test_shards, size=ft.image_size, batch_size=ft.batch_size, shard_id=self.dist.rank,
            num_shards=self.dist.world_size, device=self.dist.device,
        )
        counts = count_correct(classifier, loader, self.dist.device, progress=self.dist.is_main and ft.progress)
        if self.dist.world_size > 1:
            dist.all_reduce(counts)
        return (counts[0] / counts[1]).item()

    def close(self) -> None:
        self.metrics.close()


@torch.no_grad()
def count_correct(classifier: Classifier, loader, device: torch.device, progress: bool = False) -> torch.Tensor:
    """[correct, total] (float64) of `classifier` over one pass of an eval loader."""
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in tqdm(loader, desc="test", leave=False, dynamic_ncols=True, disable=not progress):
        logits = classifier(batch["image"].to(device))
        counts[0] += (logits.argmax(1) == batch["label"].to(device)).sum()
        counts[1] += len(logits)
    return counts


def finetune(cfg: Config, weights: str) -> dict:
    trainer = Finetuner(cfg, weights)
    try:
        return trainer.train()
    finally:
        trainer.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True,
                        help="backbone file from pretraining (backbone_final.pt), or 'random' for model.backbone "
                             "at random init")
    parser.add_argument("--config", help="YAML config (default: the demo's embedded config)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def main(argv: list[str] | None = None) -> None:
    args = launched_arguments("engine.training.finetune", __doc__, add_arguments, argv)
    cfg = load_config(args.config, args.overrides)
    run_rank_and_exit(lambda: finetune(cfg, args.weights))


if __name__ == "__main__":
    sys.exit(main())

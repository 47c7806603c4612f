"""Supervised fine-tuning: a backbone and a linear classifier trained end to end on labelled shards, then top-1 on
the test split (SEER's headline ImageNet number is a fine-tuned one). The same backbone can start from a
pretrained file or from random weights, for a comparison at the same budget.

    seer finetune --weights RUN/backbone_final.pt|random [--config FILE] [section.key=value ...]
    deepspeed --num_gpus N --module engine.training.finetune --weights ... [--config FILE] [section.key=value ...]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from dataloading.eval import build_eval_loader
from dataloading.shards import matching_class_names
from dataloading.supervised import build_supervised_loader
from engine.config import Config, ConfigError, load_config
from engine.distributed import launched_arguments, run_rank_and_exit
from engine.evaluation.classifier import Classifier, save_classifier
from engine.models.backbone import build_backbone
from engine.models.weights import backbone_from_weights, read_weights
from engine.training import loop
from engine.training.arguments import finetune_arguments
from engine.training.optim import build_optimizer, lr_schedule
from engine.training.runtime import Runtime

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
    """Backbone + linear classifier trained end to end with cross-entropy: a task of engine.training.loop."""

    def __init__(self, cfg: Config, weights: str):
        self.cfg, self.weights, ft = cfg, weights, cfg.finetune
        self.classes = _classes(ft)
        self.output_dir = Path(ft.output_dir)
        if (self.output_dir / "metrics.jsonl").exists():
            raise FileExistsError(f"{self.output_dir} already holds a fine-tuning run: set finetune.output_dir "
                                  "to a new folder")
        self.runtime = Runtime(ft, channels_last=cfg.model.channels_last)
        self.dist = self.runtime.dist
        torch.manual_seed(ft.seed)
        backbone, self.backbone_name = self._backbone(weights)
        torch.manual_seed(ft.seed)  # the head starts the same whichever way the backbone was obtained
        model = Classifier(backbone, len(self.classes)).train()
        # Momentum SGD over the pretraining optimizer's parameter groups (no weight decay on biases and norms).
        optim = dataclasses.replace(cfg.optim, name="sgd", momentum=ft.momentum, weight_decay=ft.weight_decay)
        self.engine = self.runtime.initialize(model, build_optimizer(model, optim))
        self.model = self.engine.module
        self.lr = lr_schedule(ft.steps, ft.lr * self.runtime.images_per_step / 256, ft.warmup_steps, final_fraction=0.0)
        self.loader = build_supervised_loader(
            cfg.data, ft.train_shards, size=ft.image_size, scale=ft.crop_scale, batch_size=ft.batch_size,
            seed=ft.seed, shard_id=self.dist.rank, num_shards=self.dist.world_size, device=self.dist.device,
        )
        self.classifier: Classifier | None = None  # the trained model as a plain module, after train()
        self.metrics = self.runtime.start_run_folder(cfg.to_dict(), weights=weights)

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
        record = loop.train(self, self.loader, dist=self.dist, start=0, steps=ft.steps, log_every=ft.log_every,
                            images_per_step=self.runtime.images_per_step, metrics=self.metrics,
                            progress=ft.progress, desc="finetune")
        self.classifier = self.full_classifier()
        top1 = self.top1_on_test(self.classifier)
        self.metrics.write(ft.steps, test_top1=top1)
        path = self.output_dir / CLASSIFIER_FILE
        if self.dist.is_main:
            data = self.cfg.data
            save_classifier(path, self.classifier, backbone_name=self.backbone_name, in_chans=data.channels,
                            image_size=ft.image_size, mean=data.mean, std=data.std, class_names=self.classes,
                            source="finetune")
        return {"top1": top1, "weights": self.weights, "steps": ft.steps, "train_loss": record["loss"],
                "train_top1": record["train_top1"], "classifier": str(path), "output_dir": str(self.output_dir)}

    def train_step(self, step: int, batch: dict) -> dict[str, torch.Tensor]:
        """One optimizer step: the loss and the fraction of the batch classified correctly."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr[step]
        images, labels = batch["image"], batch["label"]
        with self.runtime.autocast():
            logits = self.engine(images.contiguous(memory_format=self.runtime.memory_format))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.finetune.label_smoothing)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss, "train_top1": (logits.detach().argmax(1) == labels).float().mean()}

    def record(self, step: int, means: dict[str, float]) -> dict[str, float]:
        return {"lr": self.lr[step - 1], "epoch": self.loader.epoch}

    def after_step(self, step: int) -> None:
        pass

    def full_classifier(self) -> Classifier:
        """A plain fp32 copy of the trained model on every rank (ZeRO-3 gathers its partitions), in eval mode."""
        with self.runtime.gathered(self.model.parameters()):
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


def main(argv: list[str] | None = None) -> None:
    args = launched_arguments("engine.training.finetune", __doc__, finetune_arguments, argv)
    cfg = load_config(args.config, args.overrides)
    run_rank_and_exit(lambda: finetune(cfg, args.weights))


if __name__ == "__main__":
    sys.exit(main())

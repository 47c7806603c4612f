"""Training monitors, run at each metrics record: prototype usage with a collapse warning, and an online kNN top-1.

SwAV collapses when every image gets the same embedding: the Sinkhorn codes become uniform, the swapped
prediction can do no better than uniform probabilities, so the loss sits at ln K while one prototype is every
crop's nearest. Both show in the logged windows long before a downstream evaluation would.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dataloading.eval import build_eval_loader
from dataloading.shards import class_names, read_manifest
from engine.config import Config, MonitorConfig
from engine.distributed import DistInfo
from engine.evaluation.evaluate import extract_features, knn_top1


def prototype_usage(counts: torch.Tensor) -> dict[str, float]:
    """Statistics of one window's histogram of nearest-prototype assignments (K counts): the number of prototypes
    assigned at least once and the entropy of the histogram in nats (ln K when perfectly balanced, 0 when one
    prototype takes everything; exp(entropy) is the effective number of prototypes in use)."""
    share = counts.double() / counts.sum()
    share = share[share > 0]
    return {"proto_used": int(share.numel()), "proto_entropy": float((share * (1 / share).log()).sum())}


class CollapseMonitor:
    """Flags logged windows whose loss is near ln K or whose crops crowd onto few prototypes (thresholds and why:
    MonitorConfig), and warns once, through `warn`, after `collapse_patience` flagged windows in a row."""

    def __init__(self, cfg: MonitorConfig, num_prototypes: int, warn: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.num_prototypes = num_prototypes
        self.warn = warn
        self.streak = 0
        self.warned = False

    def update(self, step: int, loss: float, counts: torch.Tensor) -> dict[str, float]:
        """The metrics fields of one window: proto_used, proto_entropy, loss_over_ln_k and collapse (0 or 1)."""
        cfg, k = self.cfg, self.num_prototypes
        usage = prototype_usage(counts)
        loss_over_ln_k = loss / math.log(k)
        assignments = int(counts.sum())
        reasons = []
        if abs(loss_over_ln_k - 1) <= cfg.collapse_loss_band:
            reasons.append(f"loss {loss:.3f} = {loss_over_ln_k:.3f} x ln K (K={k}), the loss of uniform predictions")
        if usage["proto_entropy"] < cfg.collapse_min_entropy * math.log(min(k, assignments)):
            reasons.append(f"the {assignments} assigned crops of the window use effectively "
                           f"{math.exp(usage['proto_entropy']):.1f} of {k} prototypes "
                           f"({usage['proto_used']} at least once)")
        self.streak = self.streak + 1 if reasons and step >= cfg.collapse_check_from_step else 0
        collapsed = self.streak >= cfg.collapse_patience
        if collapsed and not self.warned and self.warn is not None:
            self.warn(f"WARNING: SwAV training looks collapsed at step {step}: {'; '.join(reasons)}; for "
                      f"{self.streak} logged windows in a row. Usual suspects: swav.epsilon or swav.temperature too "
                      f"high, optim.lr or optim.weight_decay too high. (Thresholds: monitor.collapse_*.)")
            self.warned = True
        return {**usage, "loss_over_ln_k": loss_over_ln_k, "collapse": int(collapsed)}


class OnlineKnn:
    """Weighted kNN top-1 (cfg.eval's k, temperature, image size, batch size) of a backbone's current features on
    monitor.knn_train_shards -> monitor.knn_test_shards (default: eval's), each cut to ~monitor.knn_max_samples."""

    def __init__(self, cfg: Config, device: torch.device, channels_last: bool):
        self.cfg, self.device, self.channels_last = cfg, device, channels_last
        mon = cfg.monitor
        # Built once, re-iterated at every evaluation (each pass is a whole pass, so DALI needs no draining).
        self.loaders = {
            "bank": self._loader(mon.knn_train_shards or cfg.eval.train_shards, "monitor.knn_train_shards"),
            "test": self._loader(mon.knn_test_shards or cfg.eval.test_shards, "monitor.knn_test_shards"),
        }

    def _loader(self, shards: str, key: str):
        cfg = self.cfg
        try:
            manifest = read_manifest(shards)[0]
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{key} (or its default in the eval section) is unusable: {err}") from None
        class_names(manifest, shards, key)  # the kNN votes with labels
        # A subset as DALI's shard 0 of n (a contiguous slice) rather than a pass stopped early: DALI decodes the rest
        # of an unfinished pass before the next one can start.
        max_samples = cfg.monitor.knn_max_samples
        parts = math.ceil(manifest["kept"] / max_samples) if max_samples else 1
        return build_eval_loader(cfg.data, shards, size=cfg.eval.image_size, batch_size=cfg.eval.batch_size,
                                 shard_id=0, num_shards=parts, device=self.device)

    def __call__(self, backbone: nn.Module) -> float:
        was_training = backbone.training
        backbone.eval()  # BN layers normalize with their running statistics and leave them untouched
        try:
            (bank_x, bank_y), (test_x, test_y) = (
                extract_features(backbone, loader, self.device, self.channels_last, progress=False)
                for loader in self.loaders.values())
        finally:
            backbone.train(was_training)
        return knn_top1(bank_x, bank_y, test_x, test_y, k=self.cfg.eval.knn_k,
                        temperature=self.cfg.eval.knn_temperature)


class TrainingMonitor:
    """What the monitors add to each metrics record of pretraining (engine/training/pretrain.py); `start_step`: the step
    training starts (or resumes) from."""

    def __init__(self, cfg: Config, dist_info: DistInfo, model: nn.Module, start_step: int = 0):
        self.cfg, self.model, self.last_step = cfg, model, start_step
        warn = (lambda message: tqdm.write(message, file=sys.stderr)) if dist_info.is_main else None
        self.collapse = [CollapseMonitor(cfg.monitor, k, warn) for k in cfg.prototype_heads]
        every = cfg.monitor.knn_every
        self.knn = (OnlineKnn(cfg, dist_info.device, model.memory_format == torch.channels_last)
                    if every and start_step // every < cfg.train.steps // every else None)

    def record(self, step: int, losses: list[float]) -> dict[str, float]:
        """Every rank calls this at each metrics record, with the window's loss of each prototype head: the prototype
        histograms are summed over ranks. With several heads each head's fields end in _head<i>."""
        counts = torch.cat(self.model.head.take_assignment_counts())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        values, heads = {}, counts.cpu().split([m.num_prototypes for m in self.collapse])
        for i, (monitor, loss, head_counts) in enumerate(zip(self.collapse, losses, heads)):
            suffix = f"_head{i}" if len(self.collapse) > 1 else ""
            values.update({name + suffix: v for name, v in monitor.update(step, loss, head_counts).items()})
        every = self.cfg.monitor.knn_every
        if self.knn is not None and step // every > self.last_step // every:  # a multiple of knn_every was passed
            # On every rank: under ZeRO-3 the forward gathers parameters collectively, and in the other stages the
            # other ranks would only wait for rank 0 at the next gradient all-reduce.
            values["knn_top1"] = self.knn(self.model.backbone)
        self.last_step = step
        return values

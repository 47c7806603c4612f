"""SwAV pretraining: the SwAV model's step on a DeepSpeed engine, and the resumable run around it.

    seer pretrain [--config FILE] [--resume] [section.key=value ...]
    deepspeed --num_gpus N --module engine.training.pretrain [--config FILE] [--resume] [section.key=value ...]
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
from dataloading.multicrop import build_train_loader
from engine.config import Config, ConfigError, load_config, small_batch_advice
from engine.distributed import launched_arguments, rank_divergence, run_rank_and_exit
from engine.models.batchnorm import batch_norm_group
from engine.models.swav import build_swav_model
from engine.training import loop
from engine.training.arguments import pretrain_arguments
from engine.training.checkpoint import Checkpointer, CheckpointWarning
from engine.training.monitor import TrainingMonitor
from engine.training.optim import build_optimizer, schedules
from engine.training.runtime import Runtime


class NonFiniteLoss(FloatingPointError):
    """The loss of `step` is not finite on some rank; its gradients were not applied."""

    def __init__(self, step: int, diagnostics: dict):
        super().__init__(f"loss is not finite at step {step}")
        self.step, self.diagnostics = step, diagnostics


class SwAVTraining:
    """The SwAV model on a DeepSpeed engine and its optimizer step: what pretraining runs and `seer bench train`
    times. A task of engine.training.loop; batches are dicts with "crops" (crop-major list of image tensors)."""

    def __init__(self, cfg: Config, runtime: Runtime):
        self.cfg, self.runtime, self.dist = cfg, runtime, runtime.dist
        queue_length = cfg.swav.queue_length // self.dist.world_size
        if queue_length * self.dist.world_size != cfg.swav.queue_length:
            raise ConfigError(f"swav.queue_length={cfg.swav.queue_length} is the total over ranks and must be a "
                              f"multiple of the world size ({self.dist.world_size})")
        advice = small_batch_advice(cfg, self.dist.world_size)
        if advice and self.dist.is_main:
            warnings.warn(advice, stacklevel=2)
        torch.manual_seed(cfg.train.seed)
        with runtime.building():
            model = build_swav_model(cfg, group=self.dist.group, queue_length=queue_length,
                                     bn_group=batch_norm_group(cfg.model.sync_bn_group_size))
        optimizer = build_optimizer(model, cfg.optim)
        self.engine = runtime.initialize(model, optimizer)
        optimizer.attach_zero_layout(self.engine)  # LARS norms of whole parameters, not of ZeRO's partitions
        self.model = self.engine.module
        self.model.memory_format = runtime.memory_format
        self.lr = schedules(cfg, runtime.images_per_step)
        self.resumed_at = (0, 0)  # (step, images seen): where this process took over the run

    def train_step(self, step: int, batch: dict) -> dict[str, torch.Tensor]:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr[group["name"]][step]
        head = self.model.head
        head.queue_started = step >= self.cfg.swav.queue_start_step
        with self.runtime.autocast():
            loss = self.engine(batch["crops"])
        self.engine.backward(loss)
        self._stop_unless_finite(step, loss)
        self.engine.step()
        head.normalize_prototypes(self.cfg.train.zero_stage)
        several = len(head.head_losses) > 1
        return {"loss": loss, **({f"loss_head{i}": x for i, x in enumerate(head.head_losses)} if several else {})}

    def _stop_unless_finite(self, step: int, loss: torch.Tensor) -> None:
        """One all-reduced flag per step, read before the optimizer step: no rank applies gradients of a non-finite
        loss. (The host waits for it; under ZeRO 1/2 DeepSpeed's own gradient-overflow check waits each step too.)"""
        finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.dist.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() != 1:
            raise NonFiniteLoss(step + 1, self.nonfinite_diagnostics(step, loss))

    @torch.no_grad()
    def nonfinite_diagnostics(self, step: int, loss: torch.Tensor) -> dict:
        """What a user needs to see why a loss went non-finite (collective: every rank calls it)."""
        head = self.model.head
        losses = [None] * self.dist.world_size
        dist.all_gather_object(losses, float(loss.detach()))

        def stats(x: torch.Tensor) -> dict:
            x = x.detach().float()
            good = x[torch.isfinite(x)]
            return {"non_finite": int((~torch.isfinite(x)).sum()), "min": float(good.min()) if good.numel() else None,
                    "max": float(good.max()) if good.numel() else None}

        out = {"step": step + 1, "loss_per_rank": losses, "loss_per_head": [float(x) for x in head.head_losses],
               "lr": {g["name"]: g["lr"] for g in self.engine.optimizer.param_groups}}
        embeddings = head.last_embeddings
        with self.runtime.gathered(head.prototypes.parameters()):
            unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
            out["embeddings"] = {**stats(embeddings), "norm": stats(embeddings.float().norm(dim=1))}
            out["heads"] = []
            for prototypes in head.prototypes:
                scores = unit @ prototypes.float().T
                batch, first = len(scores) // self.cfg.n_crops, self.cfg.swav.crops_for_assign[0]
                assigned = scores[first * batch:(first + 1) * batch]
                codes = kernels.sinkhorn(assigned, epsilon=self.cfg.swav.epsilon,
                                         iterations=self.cfg.swav.sinkhorn_iterations, backend="torch")
                out["heads"].append({"prototypes": stats(prototypes), "scores": stats(scores),
                                     "codes_of_first_assigned_crop": stats(codes)})
        params = list(self.model.parameters())
        out["parameters_non_finite"] = sum(not torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in params)
        out["gradients_non_finite"] = sum(p.grad is not None and not torch.isfinite(p.grad).all() for p in params)
        return out

    def head_losses(self, means: dict[str, float]) -> list[float]:
        """The window's loss of each prototype head."""
        n = len(self.model.head.heads)
        return [means[f"loss_head{i}"] for i in range(n)] if n > 1 else [means["loss"]]

    def images_seen(self, step: int) -> int:
        """Images the run has trained on after `step` steps, over every world size it ran at."""
        step0, images0 = self.resumed_at
        return images0 + (step - step0) * self.runtime.images_per_step

    def record(self, step: int, means: dict[str, float]) -> dict[str, float]:
        return {"lr": self.lr["weights"][step - 1], "images_seen": self.images_seen(step)}

    def after_step(self, step: int) -> None:
        pass


class Pretrainer(SwAVTraining):
    """SwAV pretraining on the DALI multi-crop loader: resumable checkpoints, metrics, monitors, backbone files."""

    def __init__(self, cfg: Config, resume: bool | None = None):
        """resume: True = train.resume=must (the --resume flag), False = never, None = as train.resume says."""
        runtime = Runtime(cfg.train, channels_last=cfg.model.channels_last,
                          gradient_clipping=cfg.optim.gradient_clipping)
        self.checkpointer = Checkpointer(runtime.output_dir / "checkpoints", runtime.dist.rank,
                                         runtime.dist.world_size, keep=cfg.train.keep_checkpoints)
        resume_tag = self.checkpointer.resume_tag({True: "must", False: "never", None: cfg.train.resume}[resume])
        super().__init__(cfg, runtime)
        self.output_dir = runtime.output_dir
        self.loader = build_train_loader(
            cfg.data, batch_size=cfg.train.batch_size, shard_id=self.dist.rank, num_shards=self.dist.world_size,
            device=self.dist.device, channels_last=runtime.memory_format == torch.channels_last,
        )
        self.step = 0
        self.metrics = runtime.start_run_folder(cfg.to_dict())
        state = self.checkpointer.load(self.engine, resume_tag, cfg.to_dict()) if resume_tag else None
        if state is not None:
            self.step = state["step"]
            # Checkpoints written before images_seen was recorded ran at one world size throughout.
            self.resumed_at = (self.step, state.get("images_seen", self.step * runtime.images_per_step))
            if "resharded_from" in state:  # another world size or ZeRO stage: the loader starts a new pass
                self.loader.epoch = state["loader"]["epoch"]
                self._warn_new_batch(state.get("images_per_step"))
                if self.model.head.queue.shape[1]:
                    warnings.warn("the embedding queue starts empty: it was checkpointed at another world size",
                                  CheckpointWarning, stacklevel=2)
            else:
                self.loader.load_state_dict(state["loader"])
                torch.set_rng_state(state["rng"])
                self.model.head.load_queue_state(state)
        else:
            self.save_backbone(self.output_dir / "backbone_init.pt")
        self.monitor = TrainingMonitor(cfg, self.dist, self.model, start_step=self.step)

    def train(self) -> dict:
        train = self.cfg.train
        try:
            loop.train(self, iter(self.loader), dist=self.dist, start=self.step, steps=train.steps,
                       log_every=train.log_every, images_per_step=self.runtime.images_per_step, metrics=self.metrics,
                       progress=train.progress, desc="pretrain")
        except NonFiniteLoss as err:
            path = self.output_dir / f"nonfinite_step_{err.step:08d}.json"
            if self.dist.is_main:
                path.write_text(json.dumps(err.diagnostics, indent=2) + "\n")
            raise FloatingPointError(
                f"loss is not finite at step {err.step} (per rank: {err.diagnostics['loss_per_rank']}): its gradients "
                f"were not applied and no checkpoint holds it; diagnostics (scores, codes, lr) in {path}. Usual "
                f"suspects: optim.lr too high, swav.epsilon too small for fp16") from None
        self.save_backbone(self.output_dir / "backbone_final.pt")
        return {"steps": self.step, "output_dir": str(self.output_dir), "rank_divergence": self.rank_divergence(),
                "parameters_on_rank": self.parameters_on_rank()}

    def record(self, step: int, means: dict[str, float]) -> dict[str, float]:
        record = {**super().record(step, means), "epoch": self.loader.epoch,
                  "bad_samples": self.loader.bad_samples}  # replaced by the loader's guard so far (this rank)
        record.update(self.monitor.record(step, self.head_losses(means)))  # after img/s: kNN time stays out of it
        return record

    def after_step(self, step: int) -> None:
        self.step = step
        if step % self.cfg.train.checkpoint_every == 0 or step == self.cfg.train.steps:
            self.save_checkpoint()

    def _warn_new_batch(self, saved: int | None) -> None:
        """At another world size the global batch may change, and with it the lr (optim.lr is per 256 images).
        `saved`: the checkpoint's images per step (None in checkpoints written before it was recorded)."""
        now = self.runtime.images_per_step
        if saved is not None and saved != now and self.dist.is_main:
            old, new = (self.cfg.optim.lr * batch / 256 for batch in (saved, now))
            current = self.lr["weights"][min(self.step, len(self.lr["weights"]) - 1)]
            warnings.warn(f"the global batch changes from {saved} to {now} images per step ({self.dist.world_size} "
                          f"rank(s) x train.batch_size {self.cfg.train.batch_size}): the peak learning rate goes from "
                          f"{old:g} to {new:g} (optim.lr={self.cfg.optim.lr:g} per 256 images; {current:g} at step "
                          f"{self.step}); images_seen continues from {self.resumed_at[1]:,}",
                          CheckpointWarning, stacklevel=3)

    def save_backbone(self, path: Path) -> None:
        """Backbone weights with timm's key names, plus what is needed to rebuild the network (rank 0 writes)."""
        with self.runtime.gathered(self.model.backbone.parameters()):
            if self.dist.is_main:
                state = {k: v.detach().cpu().clone() for k, v in self.model.backbone.state_dict().items()}
                torch.save({"backbone": self.cfg.model.backbone, "in_chans": self.cfg.data.channels,
                            "state_dict": state}, path)

    def parameters_on_rank(self) -> int:
        """Parameter elements this rank holds: all of them, or its ZeRO-3 partitions."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.model.parameters())

    def rank_divergence(self) -> float | None:
        """Largest difference between a rank's parameter checksum and rank 0's: data parallelism must keep it 0."""
        if self.cfg.train.zero_stage == 3:
            return None  # parameters are partitioned, not replicated
        return rank_divergence(self.model.parameters(), self.dist.device)

    def save_checkpoint(self) -> None:
        """A checkpoint of finite state only: a poisoned one would become `latest` and every resume would load it."""
        tensors = [getattr(p, "ds_tensor", p) for p in self.model.parameters()] + list(self.model.buffers())
        bad = torch.tensor([float(sum(not torch.isfinite(x).all() for x in tensors if x.is_floating_point()))],
                           device=self.dist.device)
        if self.dist.world_size > 1:
            dist.all_reduce(bad)
        if bad.item():
            raise FloatingPointError(f"{int(bad.item())} parameter or buffer tensor(s) are not finite at step "
                                     f"{self.step}: no checkpoint was written; `latest` still names the last finite one")
        self.checkpointer.save(self.engine, self.step,
                               {"loader": self.loader.state_dict(), "rng": torch.get_rng_state(),
                                "images_seen": self.images_seen(self.step),
                                "images_per_step": self.runtime.images_per_step, **self.model.head.queue_state()},
                               info={"config": self.cfg.to_dict()})

    def close(self) -> None:
        self.metrics.close()


def pretrain(cfg: Config, resume: bool | None = None) -> dict:
    trainer = Pretrainer(cfg, resume=resume)
    try:
        return trainer.train()
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> None:
    args = launched_arguments("engine.training.pretrain", __doc__, pretrain_arguments, argv)
    cfg = load_config(args.config, args.overrides)
    run_rank_and_exit(lambda: pretrain(cfg, resume=args.resume))


if __name__ == "__main__":
    sys.exit(main())

"""SwAV pretraining loop.

    seer pretrain [--config FILE] [--resume] [section.key=value ...]
    deepspeed --num_gpus N --module engine.training.pretrain [--config FILE] [--resume] [section.key=value ...]
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from deepspeed.utils import safe_set_full_fp32_param
from tqdm import tqdm

from dataloading.multicrop import build_train_loader
from engine.models.batchnorm import batch_norm_group
from engine.training.checkpoint import Checkpointer
from engine.config import Config, ConfigError, load_config
from engine.distributed import DistInfo, all_reduce_mean, init_distributed, launched_arguments, run_rank_and_exit
from engine.training.metrics import MetricsWriter
from engine.models.swav import build_swav_model
from engine.training.monitor import TrainingMonitor
from engine.training.optim import build_optimizer, schedules


def deepspeed_config(*, batch_size: int, world_size: int, zero_stage: int, gradient_clipping: float,
                     precision: str) -> dict:
    """The DeepSpeed JSON, generated from the resolved config (no second config file to keep in step).

    batch_size is per rank; shared by pretraining and fine-tuning. fp16 is DeepSpeed's torch_autocast, for its
    dynamic loss scaling (GPU, ZeRO 0). bf16 is not: through DeepSpeed 0.19.8's torch_autocast a tiny bf16 run on CPU
    turned NaN at its second step in 4 of 15 runs (0 of 15 with torch.autocast around the forward pass, which
    `autocast` below gives; gradients then stay fp32 end to end).
    """
    return {
        "torch_autocast": {"enabled": True, "dtype": "float16"} if precision == "fp16" else {"enabled": False},
        "train_micro_batch_size_per_gpu": batch_size,
        "train_batch_size": batch_size * world_size,
        "gradient_accumulation_steps": 1,
        # Explicit: DeepSpeed clips the gradient norm at 1.0 unless told otherwise, which silently shrinks the
        # plain-SGD steps of biases and norm parameters (LARS' trust ratio hides it for the weights).
        "gradient_clipping": gradient_clipping,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # our LARS/SGD is a client optimizer
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def nchw_reason(zero_stage: int, precision: str, device: torch.device) -> str | None:
    """Why model.channels_last cannot be applied here, or None when it can."""
    if zero_stage > 0:
        return "under train.zero_stage >= 1 ZeRO keeps weights as NCHW views of its flat buffers"
    if precision == "bf16" and device.type == "cpu":
        # Seen with torch 2.14.1: some weights of grouped 3x3 convolutions turned NaN after one step in 4 of 15 tiny
        # runs (0 of 12 in NCHW); helper runs also crashed in channels_last convolution backward on CPU.
        return "bf16 on CPU: oneDNN's channels_last grouped-convolution backward returned NaN (torch 2.14.1)"
    return None


def autocast(precision: str, device: torch.device):
    """The forward pass's mixed precision: bf16 autocast over fp32 weights (SEER's AMP); fp16 is DeepSpeed's."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class Pretrainer:
    def __init__(self, cfg: Config, resume: bool | None = None):
        """resume: True = train.resume=must (the --resume flag), False = never, None = as train.resume says."""
        self.cfg = cfg
        self.dist: DistInfo = init_distributed()
        if cfg.train.precision == "fp16" and self.dist.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA GPU (its loss scaling is GPU-only here); "
                              "use bf16 or fp32 on CPU")
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", self.dist.rank, self.dist.world_size,
                                         keep=cfg.train.keep_checkpoints)
        resume_tag = self.checkpointer.resume_tag({True: "must", False: "never", None: cfg.train.resume}[resume])
        ds_config = deepspeed_config(batch_size=cfg.train.batch_size, world_size=self.dist.world_size,
                                     zero_stage=cfg.train.zero_stage, gradient_clipping=cfg.optim.gradient_clipping,
                                     precision=cfg.train.precision)
        bn_group = batch_norm_group(cfg.model.sync_bn_group_size)
        torch.manual_seed(cfg.train.seed)
        # ZeRO-3: every rank allocates only its partition of each parameter while the model is built.
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=cfg.train.zero_stage == 3):
            model = build_swav_model(cfg, group=self.dist.group, bn_group=bn_group)
        model = model.to(self.dist.device)
        optimizer = build_optimizer(model, cfg.optim)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        optimizer.attach_zero_layout(self.engine)  # LARS norms of whole parameters, not of ZeRO's partitions
        self.model = self.engine.module
        # After initialize: DeepSpeed's start-up broadcast needs dense parameters.
        nchw_because = nchw_reason(cfg.train.zero_stage, cfg.train.precision, self.dist.device)
        if nchw_because is None:
            self.model.to(memory_format=self.model.memory_format)
        else:
            if self.model.memory_format == torch.channels_last and self.dist.is_main:
                print(f"note: model.channels_last is not applied: {nchw_because}; training runs NCHW", file=sys.stderr)
            self.model.memory_format = torch.contiguous_format  # NHWC inputs against NCHW weights are slow
        self.lr = schedules(cfg, cfg.train.batch_size * self.dist.world_size)
        self.loader = build_train_loader(
            cfg.data, batch_size=cfg.train.batch_size, shard_id=self.dist.rank, num_shards=self.dist.world_size,
            device=self.dist.device, channels_last=self.model.memory_format == torch.channels_last,
        )
        self.step = 0
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "git_commit": git_commit()}))
        state = self.checkpointer.load(self.engine, resume_tag, cfg.to_dict()) if resume_tag else None
        if state is not None:
            self.step = state["step"]
            if "resharded_from" in state:  # another world size or ZeRO stage: the loader starts a new pass
                self.loader.epoch = state["loader"]["epoch"]
            else:
                self.loader.load_state_dict(state["loader"])
                torch.set_rng_state(state["rng"])
        else:
            self.save_backbone(self.output_dir / "backbone_init.pt")
        self.metrics = MetricsWriter(self.output_dir, enabled=self.dist.is_main)
        self.monitor = TrainingMonitor(cfg, self.dist, self.model, start_step=self.step)

    def train(self) -> dict:
        cfg, steps = self.cfg.train, self.cfg.train.steps
        batches = iter(self.loader)
        bar = tqdm(total=steps, initial=self.step, desc="pretrain", disable=not (self.dist.is_main and cfg.progress),
                   dynamic_ncols=True)
        zero = torch.zeros((), device=self.dist.device)
        window_loss, window_start, data_time, window_steps = zero.clone(), time.perf_counter(), 0.0, 0
        while self.step < steps:
            fetch_start = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - fetch_start
            loss = self.train_step(batch["crops"])
            self.step += 1
            window_loss += loss.detach().float()
            window_steps += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "loss": all_reduce_mean(window_loss / window_steps).item(),
                    "lr": self.lr["weights"][self.step - 1],
                    "img_per_s": window_steps * cfg.batch_size * self.dist.world_size / elapsed,
                    "images_seen": self.step * cfg.batch_size * self.dist.world_size,
                    "data_time_share": data_time / elapsed,
                    "epoch": self.loader.epoch,
                    "bad_samples": self.loader.bad_samples,  # replaced by the loader's guard so far (this rank)
                }
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(f"loss is {record['loss']} at step {self.step}; see {self.metrics.path}")
                record.update(self.monitor.record(self.step, record["loss"]))  # kNN time stays out of img/s
                self.metrics.write(self.step, **record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['img_per_s']:.0f}")
                window_loss, window_start, data_time, window_steps = zero.clone(), time.perf_counter(), 0.0, 0
            if self.step % cfg.checkpoint_every == 0 or self.step == steps:
                self.save_checkpoint()
        bar.close()
        self.save_backbone(self.output_dir / "backbone_final.pt")
        return {"steps": self.step, "output_dir": str(self.output_dir), "rank_divergence": self.rank_divergence(),
                "parameters_on_rank": self.parameters_on_rank()}

    def train_step(self, crops: list[torch.Tensor]) -> torch.Tensor:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self.lr[group["name"]][self.step]
        with autocast(self.cfg.train.precision, self.dist.device):
            loss = self.engine(crops)
        self.engine.backward(loss)
        self.engine.step()
        self.normalize_prototypes()
        return loss

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Unit-norm prototype rows after each step, in the module and in ZeRO's fp32 master copy alike.

        Under ZeRO >= 1 the optimizer updates a separate fp32 copy and writes it back to the module, so an
        in-place change of the module's tensor alone would be lost at the next step.
        """
        prototypes = self.model.head.prototypes
        stage = self.cfg.train.zero_stage
        with deepspeed.zero.GatheredParameters([prototypes], modifier_rank=0, enabled=stage == 3):
            value = F.normalize(prototypes.detach().float(), dim=1)
            prototypes.copy_(value)
        if stage > 0:
            safe_set_full_fp32_param(prototypes, value)

    def save_backbone(self, path: Path) -> None:
        """Backbone weights with timm's key names, plus what is needed to rebuild the network (rank 0 writes)."""
        params = list(self.model.backbone.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.train.zero_stage == 3):
            if self.dist.is_main:
                state = {k: v.detach().cpu().clone() for k, v in self.model.backbone.state_dict().items()}
                torch.save({"backbone": self.cfg.model.backbone, "in_chans": self.cfg.data.channels,
                            "state_dict": state}, path)

    def parameters_on_rank(self) -> int:
        """Parameter elements this rank holds: all of them, or its ZeRO-3 partitions."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in self.model.parameters())

    def rank_divergence(self) -> float | None:
        """Largest parameter difference between any rank and rank 0: data parallelism must keep it 0."""
        if self.cfg.train.zero_stage == 3:
            return None  # parameters are partitioned, not replicated
        flat = torch.cat([p.detach().float().flatten() for p in self.model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        divergence = (flat - reference).abs().max()
        dist.all_reduce(divergence, op=dist.ReduceOp.MAX)
        return divergence.item()

    def save_checkpoint(self) -> None:
        self.checkpointer.save(self.engine, self.step,
                               {"loader": self.loader.state_dict(), "rng": torch.get_rng_state()},
                               info={"config": self.cfg.to_dict()})

    def close(self) -> None:
        self.metrics.close()


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def pretrain(cfg: Config, resume: bool | None = None) -> dict:
    trainer = Pretrainer(cfg, resume=resume)
    try:
        return trainer.train()
    finally:
        trainer.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: the demo's embedded config)")
    parser.add_argument("--resume", action="store_const", const=True, default=None,
                        help="same as train.resume=must: continue from the newest complete checkpoint in "
                             "train.output_dir, and fail if there is none (train.resume=auto, the default, "
                             "starts fresh then)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def main(argv: list[str] | None = None) -> None:
    args = launched_arguments("engine.training.pretrain", __doc__, add_arguments, argv)
    cfg = load_config(args.config, args.overrides)
    run_rank_and_exit(lambda: pretrain(cfg, resume=args.resume))


if __name__ == "__main__":
    sys.exit(main())

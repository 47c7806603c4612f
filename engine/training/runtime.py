"""What every training task runs on: this rank's process group and device, the DeepSpeed engine generated from the
resolved config, mixed precision, the memory format, and the run folder."""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import torch
import yaml
from torch import nn

from engine.config import ConfigError
from engine.distributed import DistInfo, init_distributed
from engine.provenance import git_commit
from engine.training.metrics import MetricsWriter


def deepspeed_config(*, batch_size: int, world_size: int, zero_stage: int, gradient_clipping: float,
                     precision: str) -> dict:
    """The DeepSpeed JSON, generated from the resolved config (no second config file to keep in step).

    batch_size is per rank. fp16 is DeepSpeed's torch_autocast, for its dynamic loss scaling (GPU, ZeRO 0). bf16 is
    not: through DeepSpeed 0.19.8's torch_autocast a tiny bf16 run on CPU turned NaN at its second step in 4 of 15
    runs (0 of 15 with torch.autocast around the forward pass, which `Runtime.autocast` gives; gradients then stay
    fp32 end to end).
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
        "steps_per_print": 10**9,  # the training loop logs
        "wall_clock_breakdown": False,
    }


def nchw_reason(zero_stage: int, precision: str, device: torch.device) -> str | None:
    """Why model.channels_last cannot be applied here, or None when it can."""
    if zero_stage > 0:
        return "under ZeRO >= 1 DeepSpeed keeps weights as NCHW views of its flat buffers"
    if precision == "bf16" and device.type == "cpu":
        # torch 2.14.1: some weights of grouped 3x3 convolutions turned NaN after one step in 4 of 15 tiny runs
        # (0 of 12 in NCHW).
        return "bf16 on CPU: oneDNN's channels_last grouped-convolution backward returned NaN (torch 2.14.1)"
    return None


class Runtime:
    """One rank of a training run. `run` is the config section with the run's settings (train or finetune:
    batch_size, precision, zero_stage, output_dir, seed); channels_last is what the config asks for, `memory_format`
    what is applied."""

    def __init__(self, run, *, channels_last: bool, gradient_clipping: float = 0.0):
        self.run = run
        self.dist: DistInfo = init_distributed()
        self.device = self.dist.device
        if run.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA GPU (its loss scaling is GPU-only here); use bf16 or fp32")
        self.ds_config = deepspeed_config(batch_size=run.batch_size, world_size=self.dist.world_size,
                                          zero_stage=run.zero_stage, gradient_clipping=gradient_clipping,
                                          precision=run.precision)
        self.output_dir = Path(run.output_dir)
        reason = nchw_reason(run.zero_stage, run.precision, self.device) if channels_last else None
        if reason and self.dist.is_main:
            print(f"note: model.channels_last is not applied: {reason}; training runs NCHW", file=sys.stderr)
        # NHWC inputs against NCHW weights are slow: one format for both.
        self.memory_format = torch.channels_last if channels_last and not reason else torch.contiguous_format

    @property
    def images_per_step(self) -> int:
        return self.run.batch_size * self.dist.world_size

    def building(self):
        """Context for building the model: under ZeRO-3 each rank allocates only its partition of each parameter."""
        return deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=self.run.zero_stage == 3)

    def initialize(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """The DeepSpeed engine over `model` (moved to this rank's device) and `optimizer`, in the memory format."""
        engine, *_ = deepspeed.initialize(model=model.to(self.device), optimizer=optimizer, config=self.ds_config)
        if self.memory_format == torch.channels_last:
            engine.module.to(memory_format=self.memory_format)  # after initialize: its broadcast needs dense weights
        return engine

    def autocast(self):
        """The forward pass's mixed precision: bf16 autocast over fp32 weights (SEER's AMP); fp16 is DeepSpeed's."""
        if self.run.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def gathered(self, params):
        """Context in which ZeRO-3 partitioned `params` are whole on every rank (a no-op below stage 3)."""
        return deepspeed.zero.GatheredParameters(list(params), enabled=self.run.zero_stage == 3)

    def start_run_folder(self, config: dict, **extra) -> MetricsWriter:
        """Create the run folder (rank 0), record the resolved config and git commit in config.yaml, and return the
        metrics writer (rank 0 writes)."""
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(
                yaml.safe_dump({**config, **extra, "git_commit": git_commit()}))
        return MetricsWriter(self.output_dir, enabled=self.dist.is_main)

"""SGD with LARS (as SEER/SwAV), parameter groups, and per-step schedules precomputed as arrays."""
from __future__ import annotations

import math

import torch
from torch import nn

# Names of the parameter groups; schedules are looked up by these.
WEIGHTS, NO_DECAY, PROTOTYPES = "weights", "no_decay", "prototypes"


class LARS(torch.optim.Optimizer):
    """Momentum SGD whose step for each parameter tensor is scaled by its LARS trust ratio.

    ratio = eta * ||w|| / (||g|| + wd * ||w|| + eps), applied to (g + wd * w), then momentum and lr (apex's LARC
    without clipping, the form SwAV and SEER trained with). Groups with `lars=False` (biases, norm parameters)
    take plain momentum SGD with their own weight decay (0 in SEER). A group whose lr is 0 is left untouched,
    momentum included: that is how prototypes are frozen in the first steps (SwAV drops their gradient).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, lars: bool = True):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars=lars)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            if lr == 0:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    # A zero weight or gradient (fresh zero-init layer, unused parameter) keeps the plain step.
                    update.mul_(torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio)))
                state = self.state[p]
                if group["momentum"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                    update = state["momentum_buffer"]
                p.add_(update, alpha=-lr)
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights (decay + LARS), biases and norm parameters (neither, as SEER), prototypes (own lr schedule)."""
    groups = {WEIGHTS: [], NO_DECAY: [], PROTOTYPES: []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("prototypes"):
            groups[PROTOTYPES].append(p)
        elif p.ndim <= 1:
            groups[NO_DECAY].append(p)
        else:
            groups[WEIGHTS].append(p)
    decay = {WEIGHTS: weight_decay, NO_DECAY: 0.0, PROTOTYPES: weight_decay}
    return [
        {"name": name, "params": params, "weight_decay": decay[name], "lars": name != NO_DECAY}
        for name, params in groups.items()
        if params
    ]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim_cfg.weight_decay)
    if optim_cfg.name == "lars":
        return LARS(groups, lr=0.0, momentum=optim_cfg.momentum, trust_coefficient=optim_cfg.trust_coefficient)
    # Plain momentum SGD: same groups and schedules, no trust ratio. Elementwise, so exact under ZeRO too.
    return LARS([{**g, "lars": False} for g in groups], lr=0.0, momentum=optim_cfg.momentum)


def lr_schedule(steps: int, peak: float, warmup_steps: int, final_fraction: float) -> list[float]:
    """Linear warm-up from 0 to `peak`, then cosine from `peak` to `peak * final_fraction`, one value per step."""
    warmup_steps = min(warmup_steps, steps)
    final = peak * final_fraction
    values = [peak * (s + 1) / warmup_steps for s in range(warmup_steps)]
    decay_steps = steps - warmup_steps
    span = max(decay_steps - 1, 1)  # the last step runs at exactly `final`
    values += [final + 0.5 * (peak - final) * (1 + math.cos(math.pi * s / span)) for s in range(decay_steps)]
    return values


def schedules(cfg, global_batch: int) -> dict[str, list[float]]:
    """Per-group lr for every step; the prototypes' lr is zero while they are frozen."""
    peak = cfg.optim.lr * global_batch / 256
    base = lr_schedule(cfg.train.steps, peak, cfg.optim.warmup_steps, cfg.optim.final_lr_fraction)
    frozen = cfg.swav.freeze_prototypes_steps
    return {
        WEIGHTS: base,
        NO_DECAY: base,
        PROTOTYPES: [0.0 if step < frozen else lr for step, lr in enumerate(base)],
    }

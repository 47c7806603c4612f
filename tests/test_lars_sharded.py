"""LARS under DeepSpeed ZeRO sharding: 2 gloo ranks at stages 0-3 against one unsharded process (no DeepSpeed).

ZeRO hands the optimizer flat partitions that cut through parameters; LARS must still use the norms of whole
parameters (all-reduced over the ranks). One spawn runs every case on the same ranks (starting ranks costs seconds):
each rank trains a tiny model for a few steps on its half of the same global batches, then the tests compare the
weights with the single process's. A case that uses the norms of the flat partitions (the bug this guards against)
shows that the comparison would catch it. Last, the same ranks pretrain through the real trainer with LARS at
ZeRO 0 and 2 (it refuses to step a partition it has no layout for, so this also shows the layout is attached).
"""
import datetime
import os
from collections import Counter
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from engine.distributed import free_port, shutdown_and_exit
from engine.training.optim import PROTOTYPES, build_optimizer
from engine.training.pretrain import pretrain
from tiny_run import demo_config, final_weights, spawn_ranks, tiny_config

WORLD, STEPS, BATCH = 2, 5, 8
# Strong LARS (eta 0.02, not SEER's 0.001) and visible weight decay, so that wrong norms move the weights far.
OPTIM = demo_config("optim.trust_coefficient=0.02", "optim.weight_decay=0.001").optim
LR, FROZEN_STEPS = 0.5, 2  # prototypes frozen (lr 0) for the first steps, as in SwAV
CASES = {  # name: ZeRO stage, extra zero_optimization settings
    "zero0": (0, {}),
    "zero1": (1, {}),
    "zero2": (2, {}),
    "zero2_round_robin": (2, {"round_robin_gradients": True}),  # puts the 3rd weight matrix before the 2nd
    "zero3": (3, {"sub_group_size": 32}),  # each group steps as sub-groups of >= 32 elements per rank
    "zero2_partition_norms": (2, {}),  # the bug: LARS norms of each rank's flat partition
}
PRETRAIN_STAGES = (0, 2, 3)


class Tiny(nn.Module):
    """All three parameter groups (weights, biases and LayerNorm, prototypes). No BatchNorm: its statistics of a
    half batch would differ from the whole batch's."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                                  nn.Linear(8, 5))
        self.prototypes = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        return self.body(x) @ self.prototypes.T


def make_model_and_optimizer():
    torch.manual_seed(0)
    model = Tiny()
    return model, build_optimizer(model, OPTIM)


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 4, generator=g)) for _ in range(STEPS)]


def set_lr(param_groups, step):
    for group in param_groups:
        group["lr"] = 0.0 if group["name"] == PROTOTYPES and step < FROZEN_STEPS else LR


def train_unsharded():
    model, optimizer = make_model_and_optimizer()
    for step, (x, y) in enumerate(global_batches()):
        set_lr(optimizer.param_groups, step)
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_sharded(rank, stage, zero_extra, partition_norms=False):
    """This rank's run: the gathered fp32 weights, the number of elements of each parameter (by slot) it holds, and
    the number of tensors LARS steps."""
    model, lars = make_model_and_optimizer()
    engine, *_ = deepspeed.initialize(model=model, optimizer=lars, config={
        "train_micro_batch_size_per_gpu": BATCH // WORLD, "train_batch_size": BATCH, "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage, **zero_extra}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    })
    lars.attach_zero_layout(engine)
    if partition_norms:  # what LARS did before it knew the layout: each flat partition taken as one parameter
        lars.set_layout({t: [(slot, 0, t.numel())] for slot, t in enumerate(lars.layout)}, group=None)
    held = Counter()
    for segments in lars.layout.values():
        for slot, _, length in segments.segments:
            held[slot] += length
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    for step, (x, y) in enumerate(global_batches()):
        set_lr(engine.optimizer.param_groups, step)
        engine.backward(F.mse_loss(engine(x[half]), y[half]))
        engine.step()
    # ZeRO 0-2 leave whole parameters in the module: in fp32 exact copies of the master weights. (Not
    # safe_get_full_fp32_param there: with round_robin_gradients, DeepSpeed 0.19.8 returns parameters swapped.)
    weights = {name: (safe_get_full_fp32_param(p) if stage == 3 else p.detach().clone())  # ZeRO-3: all ranks gather
               for name, p in engine.module.named_parameters()}
    return {"weights": weights, "held": dict(held), "stepped_tensors": len(lars.layout)}


def _worker(rank, port, out_dir, data):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    # A short timeout: if one rank fails, the other gives up instead of waiting 30 minutes.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {name: train_sharded(rank, stage, extra, partition_norms=name.endswith("partition_norms"))
               for name, (stage, extra) in CASES.items()}
    for stage in PRETRAIN_STAGES:  # optim.name=lars is the default
        results[f"pretrain_zero{stage}"] = pretrain(tiny_config(
            data, Path(out_dir) / f"pretrain_zero{stage}", "train.steps=3", "train.checkpoint_every=3",
            "model.channels_last=false", f"train.zero_stage={stage}"))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_and_exit(0)  # not the interpreter's shutdown, which races with gloo's threads


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, shards):
    """{case or pretrain_zeroN: [result of rank 0, result of rank 1]}."""
    out_dir = tmp_path_factory.mktemp("lars_sharded")
    spawn_ranks(_worker, (free_port(), str(out_dir), shards), WORLD)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {name: [r[name] for r in results] for name in results[0]}


@pytest.fixture(scope="module")
def unsharded():
    return train_unsharded()


def max_difference(weights, reference):
    return max((weights[name] - reference[name]).abs().max().item() for name in reference)


@pytest.mark.parametrize("case", ["zero0", "zero1", "zero2", "zero2_round_robin", "zero3"])
def test_sharded_lars_equals_unsharded(ranks, unsharded, case):
    numels = [p.numel() for p in make_model_and_optimizer()[1].originals]  # by slot
    rank0, rank1 = ranks[case]
    if case != "zero0":
        # The partitions really cut through parameters: some parameter has pieces on both ranks.
        held0, held1 = rank0["held"], rank1["held"]
        assert any(0 < held0.get(slot, 0) < numel and held0.get(slot, 0) + held1.get(slot, 0) == numel
                   for slot, numel in enumerate(numels))
    if case == "zero3":
        assert rank0["stepped_tensors"] > 3  # more sub-groups than the 3 parameter groups
    assert max_difference(rank1["weights"], rank0["weights"]) == 0  # both ranks gathered the same weights
    assert max_difference(rank0["weights"], unsharded) < 1e-5


def test_partition_norms_are_caught(ranks, unsharded):
    """LARS with the norms of the flat partitions ends far from the unsharded run: the test above would fail."""
    assert max_difference(ranks["zero2_partition_norms"][0]["weights"], unsharded) > 1e-3


@pytest.mark.parametrize("stage", [2, 3])
def test_pretraining_with_lars_sharded_matches_zero0(ranks, stage):
    zero0, sharded_run = ranks["pretrain_zero0"][0], ranks[f"pretrain_zero{stage}"][0]
    assert sharded_run["steps"] == 3 and sharded_run["rank_divergence"] == (0 if stage < 3 else None)
    reference, sharded = final_weights(zero0["output_dir"]), final_weights(sharded_run["output_dir"])
    for name in reference:  # ZeRO-3 also starts from the same weights although built partitioned (zero.Init)
        torch.testing.assert_close(sharded[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_zero3_ranks_hold_only_their_partitions(ranks):
    whole = ranks["pretrain_zero0"][0]["parameters_on_rank"]
    held = [result["parameters_on_rank"] for result in ranks["pretrain_zero3"]]
    assert all(0.5 * whole <= count <= 0.5 * whole + 1000 for count in held), (held, whole)  # + padding per tensor

"""BatchNorm synchronized over groups of ranks equals one process's BatchNorm over the group's whole batch.

4 gloo ranks, each with 4 of the 16 images, in float64; groups of 4, 2 and 1 ranks. Per group, the ranks' outputs, their
summed gradients and every rank's running statistics must match one process running the group's images at once.
"""
import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from engine.models.batchnorm import batch_norm_group, sync_batch_norm
from engine.distributed import free_port, shutdown_and_exit
from engine.models.backbone import build_backbone
from tiny_run import spawn_ranks

WORLD, PER_RANK, GROUP_SIZES = 4, 4, (4, 2, 1)


def make_model_and_images():
    torch.manual_seed(0)
    backbone = build_backbone("regnety_micro", in_chans=1)
    model = torch.nn.Sequential(backbone, torch.nn.BatchNorm1d(backbone.num_features))  # 2d (timm) and 1d layers
    return model.double(), torch.randn(WORLD * PER_RANK, 1, 24, 24, dtype=torch.float64)


def train_step(model, images):
    out = model(images)
    (out.square().sum() + out.sum()).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()], [b.clone() for b in model.buffers()]


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    base, images = make_model_and_images()
    results = {}
    for size in GROUP_SIZES:
        model = sync_batch_norm(copy.deepcopy(base), batch_norm_group(size))
        out, grads, buffers = train_step(model, images[rank * PER_RANK:(rank + 1) * PER_RANK])
        group_ranks = list(range(rank // size * size, rank // size * size + size))
        for grad in grads:  # sum over the group's ranks = the gradient of the group's summed loss
            parts = [torch.zeros_like(grad) for _ in range(WORLD)]
            dist.all_gather(parts, grad)
            grad.copy_(sum(parts[r] for r in group_ranks))
        results[size] = (out, grads, buffers)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    shutdown_and_exit(0)  # not the interpreter's shutdown, which races with gloo's threads


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("syncbn")
    spawn_ranks(_rank, (free_port(), str(out_dir)), WORLD)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("size", GROUP_SIZES)
def test_group_batch_norm_equals_one_process_on_the_group_batch(rank_results, size):
    base, images = make_model_and_images()
    for first in range(0, WORLD, size):
        reference = train_step(copy.deepcopy(base), images[first * PER_RANK:(first + size) * PER_RANK])
        for rank in range(first, first + size):
            out, grads, buffers = rank_results[rank][size]
            local = slice((rank - first) * PER_RANK, (rank - first + 1) * PER_RANK)
            torch.testing.assert_close(out, reference[0][local], rtol=1e-9, atol=1e-9)
            for got, want in zip(grads, reference[1]):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
            for got, want in zip(buffers, reference[2]):  # running stats agree with the group's, on every rank
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_groups_really_differ(rank_results):
    """The check above can fail: per-rank BN (size 1) and whole-world BN see other statistics."""
    per_rank, whole = rank_results[0][1][2], rank_results[0][4][2]
    assert max((a.float() - b.float()).abs().max().item() for a, b in zip(per_rank, whole)) > 1e-3


def test_group_size_must_divide_the_world():
    with pytest.raises(ValueError, match="model.sync_bn_group_size"):
        batch_norm_group(0)

"""kernels under data parallelism: 2 gloo ranks, each with part of a batch, against one process on all of it.

One spawn runs every case (starting ranks costs seconds); the ranks save their results and the tests compare.
"""

import datetime
import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kernels import sinkhorn, swav_loss

WORLD = 2
SINKHORN_CASES = {  # name: (local batch sizes, epsilon, iterations)
    "even": ((8, 8), 0.05, 3),
    "uneven": ((5, 7), 0.05, 3),
    "seer": ((6, 10), 0.03, 10),
}
K, D = 10, 6
LOSS = dict(n_crops=4, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)
LOSS_B = 8  # global batch, split evenly: 4 samples per rank


def make_inputs():
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name, (sizes, _, _) in SINKHORN_CASES.items():
        z = F.normalize(torch.randn(sum(sizes), D, generator=g), dim=1)
        inputs[name] = z @ F.normalize(torch.randn(K, D, generator=g), dim=1).T
    inputs["embeddings"] = 3 * torch.randn(LOSS["n_crops"] * LOSS_B, D, generator=g)
    inputs["prototypes"] = F.normalize(torch.randn(K, D, generator=g), dim=1)
    return inputs


def rank_slice(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def local_embeddings(embeddings, rank):
    """This rank's half of every crop, still crop-major."""
    n_crops, half = LOSS["n_crops"], LOSS_B // WORLD
    return embeddings.view(n_crops, LOSS_B, D)[:, rank * half:(rank + 1) * half].reshape(-1, D)


def _worker(rank, port, inputs_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout: if one rank fails, the other gives up instead of waiting 30 minutes.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    inputs = torch.load(inputs_path)
    results = {}
    for name, (sizes, epsilon, iterations) in SINKHORN_CASES.items():
        scores = inputs[name][rank_slice(rank, sizes)]
        results[name] = sinkhorn(scores, epsilon=epsilon, iterations=iterations, group=dist.group.WORLD)
    embeddings = local_embeddings(inputs["embeddings"], rank).requires_grad_()
    prototypes = inputs["prototypes"].clone().requires_grad_()
    loss = swav_loss(embeddings, prototypes, group=dist.group.WORLD, **LOSS)
    loss.backward()
    # Data-parallel training averages parameter gradients over ranks; this rank's embeddings reach the
    # shared parameters only through this rank, so their share of the averaged gradient is grad / WORLD.
    dist.all_reduce(prototypes.grad)
    results.update(
        loss=loss.detach(), embeddings_grad=embeddings.grad / WORLD, prototypes_grad=prototypes.grad / WORLD
    )
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Leave without the interpreter's shutdown, which races with gloo's threads (see PLATFORM.md).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """(inputs, [results of rank 0, results of rank 1])."""
    out_dir = tmp_path_factory.mktemp("kernels_distributed")
    inputs = make_inputs()
    torch.save(inputs, out_dir / "inputs.pt")
    mp.spawn(_worker, args=(free_port(), str(out_dir / "inputs.pt"), str(out_dir)), nprocs=WORLD, join=True)
    return inputs, [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", SINKHORN_CASES)
def test_sinkhorn_matches_single_process(ranks, name):
    inputs, results = ranks
    _, epsilon, iterations = SINKHORN_CASES[name]
    expected = sinkhorn(inputs[name], epsilon=epsilon, iterations=iterations)
    torch.testing.assert_close(torch.cat([r[name] for r in results]), expected, atol=1e-6, rtol=0)


def test_swav_loss_and_gradients_match_single_process(ranks):
    inputs, results = ranks
    embeddings = inputs["embeddings"].clone().requires_grad_()
    prototypes = inputs["prototypes"].clone().requires_grad_()
    loss = swav_loss(embeddings, prototypes, **LOSS)
    loss.backward()
    # Equal local batches: the mean of the local losses is the global loss, and averaged gradients are
    # the global gradients. Seen: agreement to ~1e-7 in fp32.
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), loss.detach(), atol=0, rtol=1e-6)
    torch.testing.assert_close(results[0]["prototypes_grad"], prototypes.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1]["prototypes_grad"], prototypes.grad, atol=1e-6, rtol=1e-5)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["embeddings_grad"], local_embeddings(embeddings.grad, rank), atol=1e-6, rtol=1e-5)

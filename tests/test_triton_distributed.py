"""backend="triton" under data parallelism: 2 gloo ranks, each with part of a batch, against one process on all of it.

With `group`, the Sinkhorn kernels stop after the prototype sums of each iteration, the launcher all-reduces the two
K-vectors (column maxima, then max-shifted sums), and a second pass finishes the iteration. One spawn runs every
case (the ranks run the kernels in Triton's interpreter: TRITON_INTERPRET=1 is inherited from conftest).
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
from test_triton_sinkhorn import assert_close

WORLD = 2
K, D = 100, 24  # 4 Sinkhorn column blocks of 32 (the last one partial); K is small to keep 2 interpreters fast
SINKHORN_CASES = {  # name: (local batch sizes, epsilon, iterations, dtype)
    "uneven-eps0.01": ((5, 9), 0.01, 3, torch.float32),
    "seer-bf16": ((7, 7), 0.03, 10, torch.bfloat16),
}
LOSS = dict(n_crops=6, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.03, sinkhorn_iterations=3)
LOSS_B = 14  # global batch per crop, split evenly: 7 samples per rank (SEER's 2 + 4 crops)


def make_inputs():
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name, (sizes, _, _, dtype) in SINKHORN_CASES.items():
        z = F.normalize(torch.randn(sum(sizes), D, generator=g), dim=1)
        inputs[name] = (z @ F.normalize(torch.randn(K, D, generator=g), dim=1).T).to(dtype)
    inputs["embeddings"] = 3 * torch.randn(LOSS["n_crops"] * LOSS_B, D, generator=g)
    inputs["prototypes"] = F.normalize(torch.randn(K, D, generator=g), dim=1)
    return inputs


def rank_slice(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def local_embeddings(embeddings, rank):
    """This rank's half of every crop, still crop-major."""
    half = LOSS_B // WORLD
    return embeddings.view(LOSS["n_crops"], LOSS_B, D)[:, rank * half:(rank + 1) * half].reshape(-1, D)


def _worker(rank, port, inputs_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    inputs = torch.load(inputs_path)
    results = {}
    for name, (sizes, epsilon, iterations, _) in SINKHORN_CASES.items():
        scores = inputs[name][rank_slice(rank, sizes)]
        results[name] = sinkhorn(scores, epsilon=epsilon, iterations=iterations, group=dist.group.WORLD,
                                 backend="triton")
    embeddings = local_embeddings(inputs["embeddings"], rank).requires_grad_()
    prototypes = inputs["prototypes"].clone().requires_grad_()
    loss = swav_loss(embeddings, prototypes, group=dist.group.WORLD, backend="triton", **LOSS)
    loss.backward()
    dist.all_reduce(prototypes.grad)  # data-parallel averaging (see tests/test_kernels_distributed.py)
    results.update(
        loss=loss.detach(), embeddings_grad=embeddings.grad / WORLD, prototypes_grad=prototypes.grad / WORLD
    )
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    gc.collect()  # leave without the interpreter's shutdown, which races with gloo's threads (PLATFORM.md)
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
    out_dir = tmp_path_factory.mktemp("triton_distributed")
    inputs = make_inputs()
    torch.save(inputs, out_dir / "inputs.pt")
    mp.spawn(_worker, args=(free_port(), str(out_dir / "inputs.pt"), str(out_dir)), nprocs=WORLD, join=True)
    return inputs, [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", SINKHORN_CASES)
def test_sinkhorn_matches_single_process(ranks, name):
    inputs, results = ranks
    _, epsilon, iterations, _ = SINKHORN_CASES[name]
    got = torch.cat([r[name] for r in results])
    # Seen ≤ 1.5e-7 (all-reduced sums add in another order than one process's).
    for backend in ("triton", "torch"):
        want = sinkhorn(inputs[name], epsilon=epsilon, iterations=iterations, backend=backend)
        assert_close(got, want, atol=1e-6, rtol=0, name=f"codes of 2 ranks vs one {backend} process")


def test_swav_loss_and_gradients_match_single_process(ranks):
    inputs, results = ranks
    for backend in ("triton", "torch"):
        embeddings = inputs["embeddings"].clone().requires_grad_()
        prototypes = inputs["prototypes"].clone().requires_grad_()
        loss = swav_loss(embeddings, prototypes, backend=backend, **LOSS)
        loss.backward()
        # Equal local batches: the mean of the local losses is the global loss, averaged gradients are global ones.
        assert_close(torch.stack([r["loss"] for r in results]).mean(), loss, atol=0, rtol=1e-6, name="loss")
        for rank, r in enumerate(results):
            assert_close(r["prototypes_grad"], prototypes.grad, atol=1e-7, rtol=1e-4, name=f"rank {rank} dP")
            assert_close(r["embeddings_grad"], local_embeddings(embeddings.grad, rank), atol=1e-7, rtol=1e-4,
                         name=f"rank {rank} dE")

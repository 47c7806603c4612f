"""kernels under data parallelism: 2 gloo ranks, each with part of a batch, against one process on all of it, for
both backends: "torch" (the reference) and "triton".

With `group`, the Triton Sinkhorn kernels stop after the prototype sums of each iteration, the launcher merges the
row chunks' statistics and all-reduces the two K-vectors (column maxima, then max-shifted sums), and a second pass
finishes the iteration.

One spawn runs every case of both backends (starting ranks costs seconds; the ranks run the Triton kernels in
Triton's interpreter: TRITON_INTERPRET=1 is inherited from conftest); the ranks save their results and the tests
compare.
"""

import datetime
import os
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.distributed import free_port, shutdown_and_exit
from kernel_checks import assert_close
from kernels import sinkhorn, swav_loss
from tiny_run import spawn_ranks

WORLD = 2


class Setup(NamedTuple):
    """One backend's cases: Sinkhorn scores split over the ranks in the given local sizes, and a SwAV loss batch."""

    sinkhorn_cases: dict  # name: (local batch sizes, epsilon, iterations, dtype)
    K: int
    D: int
    loss: dict  # swav_loss keyword arguments
    loss_b: int  # global batch per crop, split evenly over the ranks


SETUPS = {  # backend: its cases (each backend draws its inputs from its own generator)
    "torch": Setup(
        sinkhorn_cases={
            "even": ((8, 8), 0.05, 3, torch.float32),
            "uneven": ((5, 7), 0.05, 3, torch.float32),
            "seer": ((6, 10), 0.03, 10, torch.float32),
        },
        K=10,
        D=6,
        loss=dict(n_crops=4, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.05, sinkhorn_iterations=3),
        loss_b=8,  # global batch, split evenly: 4 samples per rank
    ),
    "triton": Setup(
        sinkhorn_cases={
            "uneven-eps0.01": ((5, 9), 0.01, 3, torch.float32),
            "seer-bf16": ((7, 7), 0.03, 10, torch.bfloat16),
            "rows-split": ((256, 300), 0.05, 3, torch.float32),  # each rank's rows in 2 or 3 chunks of programs
        },
        K=100,  # 4 Sinkhorn column blocks of 32 (the last one partial); K is small to keep 2 interpreters fast
        D=24,
        loss=dict(n_crops=6, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.03, sinkhorn_iterations=3),
        loss_b=14,  # global batch per crop, split evenly: 7 samples per rank (SEER's 2 + 4 crops)
    ),
}
TORCH, TRITON = SETUPS["torch"], SETUPS["triton"]


def make_inputs(setup):
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name, (sizes, _, _, dtype) in setup.sinkhorn_cases.items():
        z = F.normalize(torch.randn(sum(sizes), setup.D, generator=g), dim=1)
        inputs[name] = (z @ F.normalize(torch.randn(setup.K, setup.D, generator=g), dim=1).T).to(dtype)
    inputs["embeddings"] = 3 * torch.randn(setup.loss["n_crops"] * setup.loss_b, setup.D, generator=g)
    inputs["prototypes"] = F.normalize(torch.randn(setup.K, setup.D, generator=g), dim=1)
    return inputs


def rank_slice(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def local_embeddings(embeddings, rank, setup):
    """This rank's half of every crop, still crop-major."""
    n_crops, half = setup.loss["n_crops"], setup.loss_b // WORLD
    return embeddings.view(n_crops, setup.loss_b, setup.D)[:, rank * half:(rank + 1) * half].reshape(-1, setup.D)


def start_gloo_rank(rank, port):
    """Join the WORLD-rank gloo group of a test worker (one thread per rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout: if one rank fails, the other gives up instead of waiting 30 minutes (120 s, not 60: the
    # ranks also run the Triton cases in Triton's interpreter).
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))


def data_parallel_loss(inputs, rank, setup, backend, queue=None):
    """This rank's swav_loss over its half of the batch, and its share of the data-parallel gradients."""
    embeddings = local_embeddings(inputs["embeddings"], rank, setup).requires_grad_()
    prototypes = inputs["prototypes"].clone().requires_grad_()
    loss = swav_loss(embeddings, prototypes, queue=queue, group=dist.group.WORLD, backend=backend, **setup.loss)
    loss.backward()
    # Data-parallel training averages parameter gradients over ranks; this rank's embeddings reach the shared
    # parameters only through this rank, so their share of the averaged gradient is grad / WORLD.
    dist.all_reduce(prototypes.grad)
    return dict(loss=loss.detach(), embeddings_grad=embeddings.grad / WORLD, prototypes_grad=prototypes.grad / WORLD)


def _worker(rank, port, inputs_path, out_dir):
    start_gloo_rank(rank, port)
    all_inputs = torch.load(inputs_path)
    results = {}
    for backend, setup in SETUPS.items():
        inputs, results[backend] = all_inputs[backend], {}
        for name, (sizes, epsilon, iterations, _) in setup.sinkhorn_cases.items():
            scores = inputs[name][rank_slice(rank, sizes)]
            results[backend][name] = sinkhorn(scores, epsilon=epsilon, iterations=iterations, group=dist.group.WORLD,
                                              backend=backend)
        results[backend].update(data_parallel_loss(inputs, rank, setup, backend))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_and_exit(0)  # not the interpreter's shutdown, which races with gloo's threads


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{backend: (inputs, [results of rank 0, results of rank 1])}."""
    out_dir = tmp_path_factory.mktemp("kernels_distributed")
    inputs = {backend: make_inputs(setup) for backend, setup in SETUPS.items()}
    torch.save(inputs, out_dir / "inputs.pt")
    spawn_ranks(_worker, (free_port(), str(out_dir / "inputs.pt"), str(out_dir)), WORLD)
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
    return {backend: (inputs[backend], [r[backend] for r in results]) for backend in SETUPS}


# backend="torch"


@pytest.mark.parametrize("name", TORCH.sinkhorn_cases)
def test_sinkhorn_matches_single_process(ranks, name):
    inputs, results = ranks["torch"]
    _, epsilon, iterations, _ = TORCH.sinkhorn_cases[name]
    expected = sinkhorn(inputs[name], epsilon=epsilon, iterations=iterations)
    torch.testing.assert_close(torch.cat([r[name] for r in results]), expected, atol=1e-6, rtol=0)


def test_swav_loss_and_gradients_match_single_process(ranks):
    inputs, results = ranks["torch"]
    embeddings = inputs["embeddings"].clone().requires_grad_()
    prototypes = inputs["prototypes"].clone().requires_grad_()
    loss = swav_loss(embeddings, prototypes, **TORCH.loss)
    loss.backward()
    # Equal local batches: the mean of the local losses is the global loss, and averaged gradients are
    # the global gradients. Seen: agreement to ~1e-7 in fp32.
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), loss.detach(), atol=0, rtol=1e-6)
    torch.testing.assert_close(results[0]["prototypes_grad"], prototypes.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(results[1]["prototypes_grad"], prototypes.grad, atol=1e-6, rtol=1e-5)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["embeddings_grad"], local_embeddings(embeddings.grad, rank, TORCH), atol=1e-6,
                                   rtol=1e-5)


# backend="triton": the 2 ranks' results against one process of each backend.


@pytest.mark.parametrize("name", TRITON.sinkhorn_cases)
def test_triton_sinkhorn_matches_single_process(ranks, name):
    inputs, results = ranks["triton"]
    _, epsilon, iterations, _ = TRITON.sinkhorn_cases[name]
    got = torch.cat([r[name] for r in results])
    # Seen ≤ 1.5e-7 (all-reduced sums add in another order than one process's).
    for backend in ("triton", "torch"):
        want = sinkhorn(inputs[name], epsilon=epsilon, iterations=iterations, backend=backend)
        assert_close(got, want, atol=1e-6, rtol=0, name=f"codes of 2 ranks vs one {backend} process")


def test_triton_swav_loss_and_gradients_match_single_process(ranks):
    inputs, results = ranks["triton"]
    for backend in ("triton", "torch"):
        embeddings = inputs["embeddings"].clone().requires_grad_()
        prototypes = inputs["prototypes"].clone().requires_grad_()
        loss = swav_loss(embeddings, prototypes, backend=backend, **TRITON.loss)
        loss.backward()
        # Equal local batches: the mean of the local losses is the global loss, averaged gradients are global ones.
        assert_close(torch.stack([r["loss"] for r in results]).mean(), loss, atol=0, rtol=1e-6, name="loss")
        for rank, r in enumerate(results):
            assert_close(r["prototypes_grad"], prototypes.grad, atol=1e-7, rtol=1e-4, name=f"rank {rank} dP")
            assert_close(r["embeddings_grad"], local_embeddings(embeddings.grad, rank, TRITON), atol=1e-7,
                         rtol=1e-4, name=f"rank {rank} dE")

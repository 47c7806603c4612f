"""kernels.swav_loss with a queue of past embeddings (SwAV/VISSL's queue), both backends ("torch" and "triton", the
latter in Triton's interpreter: conftest sets TRITON_INTERPRET=1).

The contract, as VISSL's swav_loss computes it: for assigned crop i, Sinkhorn runs on cat(scores of the crop's batch
rows, normalize(queue[i]) @ Pᵀ), its prototype sums over every rank's batch and queue rows; only the batch rows'
codes enter the loss; the queue gets no gradient. Checked against an fp64 computation written out here with SwAV's
plain Sinkhorn, and with 2 gloo ranks against one process on the concatenation of their batches and queues.

Shapes are small (K = 100: 4 Sinkhorn column blocks of 32, the last one partial), the interpreter being slow.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from engine.distributed import free_port, shutdown_and_exit
from kernel_checks import assert_close, fp64_swav_loss, grad_tolerance
from kernels import swav_loss, swav_loss_reference
from kernels.sinkhorn import sinkhorn_config
from test_kernels_distributed import WORLD, Setup, data_parallel_loss, local_embeddings, start_gloo_rank
from tiny_run import spawn_ranks

BACKENDS = ("torch", "triton")
D, K = 24, 100


def make_inputs(n_crops, b, length, n_assign, seed=0, dtype=torch.float32):
    """Unnormalized embeddings (crop-major) and queue, unit-norm prototypes; the queue does not require grad."""
    g = torch.Generator().manual_seed(seed)
    embeddings = 3 * torch.randn(n_crops * b, D, generator=g, dtype=torch.float64)
    prototypes = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    queue = 3 * torch.randn(n_assign, length, D, generator=g, dtype=torch.float64)
    return embeddings.to(dtype).requires_grad_(), prototypes.to(dtype).requires_grad_(), queue.to(dtype)


def loss_and_grads(embeddings, prototypes, queue, backend, grad_output=1.0, **kwargs):
    loss = swav_loss(embeddings, prototypes, queue=queue, backend=backend, **kwargs)
    return (loss, *torch.autograd.grad(loss, (embeddings, prototypes), grad_outputs=torch.tensor(grad_output)))


def fp64_loss_and_grads(embeddings, prototypes, queue, grad_output=1.0, *, n_crops, crops_for_assign, temperature,
                        epsilon, sinkhorn_iterations):
    e64, p64 = (t.detach().double().requires_grad_() for t in (embeddings, prototypes))
    loss = fp64_swav_loss(e64, p64, n_crops, crops_for_assign, temperature, epsilon, sinkhorn_iterations, queue)
    return (loss, *torch.autograd.grad(loss, (e64, p64), grad_outputs=torch.tensor(grad_output, dtype=torch.float64)))


def assert_matches(got, want, dtype, what):
    """Loss, dE, dP of a backend against the fp64 computation.

    Seen over these tests, both backends: fp32 loss ≤ 1.7e-7 relative, gradients ≤ 2.8e-7 absolute (entries up to
    0.7; beyond atol ≤ 2e-6 relative). bf16 inputs: the fp64 computation sees the same rounded values, so the loss
    agrees as in fp32 (≤ 5e-8); the gradients (kernel_checks.grad_tolerance): Triton ≤ 0.54% of the largest entry.
    """
    assert_close(got[0], want[0], atol=0, rtol=1e-6, name=f"loss {what}")
    assert_close(got[1], want[1], **grad_tolerance(dtype, want[1]), name=f"embeddings grad {what}")
    assert_close(got[2], want[2], **grad_tolerance(dtype, want[2]), name=f"prototypes grad {what}")


CASES = [  # n_crops, crops_for_assign, b, queue length L, epsilon, iterations
    pytest.param(4, (0, 1), 6, 9, 0.05, 3, id="4crops-assign01-L9"),
    pytest.param(4, (0, 2, 3), 5, 7, 0.03, 10, id="4crops-assign023-L7-it10"),
    pytest.param(3, (1,), 4, 150, 0.05, 3, id="3crops-assign1-L150"),  # queue longer than a Sinkhorn row chunk
]


@pytest.mark.parametrize("n_crops,crops_for_assign,b,length,epsilon,iterations", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fp64_with_appended_queue(backend, dtype, n_crops, crops_for_assign, b, length, epsilon, iterations):
    kwargs = dict(n_crops=n_crops, crops_for_assign=crops_for_assign, temperature=0.1, epsilon=epsilon,
                  sinkhorn_iterations=iterations)
    embeddings, prototypes, queue = make_inputs(n_crops, b, length, len(crops_for_assign), seed=length, dtype=dtype)
    if length > 100:
        assert length > sinkhorn_config(length, K)["BLOCK_B"]  # the kernels sweep the queue rows in several chunks
    got = loss_and_grads(embeddings, prototypes, queue, backend, **kwargs)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    want = fp64_loss_and_grads(embeddings, prototypes, queue, **kwargs)
    assert_matches(got, want, dtype, "vs fp64 with the queue appended")
    # The queue moves the loss 100 times the loss tolerance or more (else the case would prove nothing).
    without = fp64_swav_loss(embeddings.detach(), prototypes.detach(), n_crops, crops_for_assign, 0.1, epsilon,
                             iterations)
    assert abs(without.item() - want[0].item()) > 1e-4 * want[0].item()


def test_queue_rows_split_over_programs(monkeypatch):
    """Sinkhorn's rows split over programs (as on a GPU where the column blocks alone leave SMs idle), one chunk
    holding the batch's rows and the queue's first rows, the next the rest of the queue."""
    sk = importlib.import_module("kernels.sinkhorn")
    monkeypatch.setattr(sk, "MIN_CHUNK", 32)
    b, length = 20, 50
    cfg = sinkhorn_config(b + length, K)
    assert cfg["chunks"] == 2 and b < cfg["chunk"] < b + length, cfg
    kwargs = dict(n_crops=3, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)
    embeddings, prototypes, queue = make_inputs(3, b, length, 2, seed=13)
    got = loss_and_grads(embeddings, prototypes, queue, "triton", **kwargs)
    want = fp64_loss_and_grads(embeddings, prototypes, queue, **kwargs)
    assert_matches(got, want, torch.float32, "with Sinkhorn's rows in two chunks")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_loss(backend):
    """A loss scaled before backward (grad_output != 1, as under loss scaling or loss weights)."""
    kwargs = dict(n_crops=4, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)
    embeddings, prototypes, queue = make_inputs(4, 5, 8, 2, seed=11)
    got = loss_and_grads(embeddings, prototypes, queue, backend, grad_output=-2.5, **kwargs)
    want = fp64_loss_and_grads(embeddings, prototypes, queue, grad_output=-2.5, **kwargs)
    assert_matches(got, want, torch.float32, "scaled by -2.5")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    kwargs = dict(n_crops=4, crops_for_assign=(1, 3), temperature=0.1, epsilon=0.03, sinkhorn_iterations=3)
    embeddings, prototypes, queue = make_inputs(4, 5, 8, 2, seed=12)
    embeddings = embeddings.detach().T.contiguous().T.requires_grad_()  # column-major views
    prototypes = prototypes.detach().T.contiguous().T.requires_grad_()
    queue = torch.stack((queue, torch.zeros_like(queue)), dim=3).flatten(2)[..., ::2]  # column stride 2
    assert not (embeddings.is_contiguous() or prototypes.is_contiguous() or queue.is_contiguous())
    got = loss_and_grads(embeddings, prototypes, queue, backend, **kwargs)
    want = fp64_loss_and_grads(embeddings, prototypes, queue, **kwargs)
    assert_matches(got, want, torch.float32, "on non-contiguous inputs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queue_equals_no_queue(backend):
    kwargs = dict(n_crops=4, crops_for_assign=(0, 1), epsilon=0.05, sinkhorn_iterations=3)
    embeddings, prototypes, queue = make_inputs(4, 5, 0, 2, seed=13)
    assert queue.shape == (2, 0, D)
    got = loss_and_grads(embeddings, prototypes, queue.requires_grad_(), backend, **kwargs)
    want = loss_and_grads(embeddings, prototypes, None, backend, **kwargs)
    for name, g, w in zip(("loss", "embeddings grad", "prototypes grad"), got, want):
        assert_close(g, w, atol=0, rtol=0, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_gets_no_gradient(backend):
    kwargs = dict(n_crops=4, crops_for_assign=(0, 1), epsilon=0.05, sinkhorn_iterations=3)
    embeddings, prototypes, queue = make_inputs(4, 5, 6, 2, seed=14)
    queue.requires_grad_()
    loss = swav_loss(embeddings, prototypes, queue=queue, backend=backend, **kwargs)
    assert torch.autograd.grad(loss, queue, allow_unused=True) == (None,)
    loss = swav_loss(embeddings, prototypes, queue=queue, backend=backend, **kwargs)
    loss.backward()
    assert queue.grad is None
    # The batch's gradients are those of a constant queue.
    want = loss_and_grads(embeddings, prototypes, queue.detach(), backend, **kwargs)
    for name, g, w in zip(("loss", "embeddings grad", "prototypes grad"), (loss, embeddings.grad, prototypes.grad),
                          want):
        assert_close(g, w, atol=0, rtol=0, name=name)


@pytest.mark.parametrize(
    "queue,match",
    [
        (torch.zeros(2, 8), r"queue must be 3-D \(len\(crops_for_assign\)=2 × L × D=8\), got shape \(2, 8\)"),
        (torch.zeros(3, 5, 8), r"queue has 3 slots \(shape \(3, 5, 8\)\) but crops_for_assign \(0, 1\) names 2"),
        (torch.zeros(2, 5, 7), r"queue has D=7 \(shape \(2, 5, 7\)\) but embeddings have D=8 \(shape \(12, 8\)\)"),
        (torch.zeros(2, 5, 8, device="meta"), "queue is on meta but embeddings are on cpu"),
    ],
)
def test_queue_shape_errors(queue, match):
    for fn in (swav_loss, swav_loss_reference):
        with pytest.raises(ValueError, match=match):
            fn(torch.zeros(12, 8), torch.zeros(5, 8), n_crops=4, queue=queue)


# 2 gloo ranks, each with its half of every crop's batch and its own queue, against one process on all of it.

DISTRIBUTED = {  # case: (backend, shapes and loss arguments, queue length per rank, embeddings dtype)
    "torch": ("torch", Setup(sinkhorn_cases={}, K=K, D=D, loss=dict(n_crops=3, crops_for_assign=(0, 1, 2),
                                                                    temperature=0.1, epsilon=0.05,
                                                                    sinkhorn_iterations=10), loss_b=8), 5,
              torch.float32),
    "triton": ("triton", Setup(sinkhorn_cases={}, K=K, D=D, loss=dict(n_crops=4, crops_for_assign=(0, 2),
                                                                      temperature=0.1, epsilon=0.03,
                                                                      sinkhorn_iterations=3), loss_b=10), 6,
               torch.float32),
    # The training path: bf16 embeddings × fp32 prototypes, bf16 matmuls and a bf16 G in the backward.
    "triton-bf16xfp32": ("triton", Setup(sinkhorn_cases={}, K=K, D=D, loss=dict(n_crops=3, crops_for_assign=(0, 1),
                                                                                temperature=0.1, epsilon=0.05,
                                                                                sinkhorn_iterations=3), loss_b=6), 4,
                         torch.bfloat16),
}


def _worker(rank, port, inputs_path, out_dir):
    start_gloo_rank(rank, port)
    all_inputs = torch.load(inputs_path)
    results = {}
    for case, (backend, setup, length, _) in DISTRIBUTED.items():
        queue = all_inputs[case]["queue"][:, rank * length:(rank + 1) * length]
        results[case] = data_parallel_loss(all_inputs[case], rank, setup, backend, queue)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_and_exit(0)  # not the interpreter's shutdown, which races with gloo's threads


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{case: (inputs, [results of rank 0, results of rank 1])}."""
    out_dir = tmp_path_factory.mktemp("swav_queue_distributed")
    inputs = {}
    for seed, (case, (_, setup, length, dtype)) in enumerate(DISTRIBUTED.items()):
        embeddings, prototypes, queue = make_inputs(setup.loss["n_crops"], setup.loss_b, WORLD * length,
                                                    len(setup.loss["crops_for_assign"]), seed=seed)
        inputs[case] = dict(embeddings=embeddings.detach().to(dtype), prototypes=prototypes.detach(), queue=queue)
    torch.save(inputs, out_dir / "inputs.pt")
    spawn_ranks(_worker, (free_port(), str(out_dir / "inputs.pt"), str(out_dir)), WORLD)
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]
    return {case: (inputs[case], [r[case] for r in results]) for case in DISTRIBUTED}


@pytest.mark.parametrize("case", DISTRIBUTED)
def test_two_ranks_match_one_process_on_the_concatenation(ranks, case):
    inputs, results = ranks[case]
    backend, setup, _, dtype = DISTRIBUTED[case]
    embeddings = inputs["embeddings"].clone().requires_grad_()
    prototypes = inputs["prototypes"].clone().requires_grad_()
    # One process: both ranks' batch rows and both ranks' queue rows.
    single = {other: loss_and_grads(embeddings, prototypes, inputs["queue"], other, **setup.loss)
              for other in BACKENDS if other == "torch" or backend == "triton"}
    single["fp64"] = fp64_loss_and_grads(embeddings, prototypes, inputs["queue"], **setup.loss)
    for what, (loss, grad_e, grad_p) in single.items():
        # Equal local batches: the mean of the local losses is the global loss, averaged gradients are global ones.
        # Seen: ≤ 2e-7 relative (all-reduced sums add in another order than one process's); bf16 × fp32 against
        # fp32 matmuls (torch, fp64): the prototypes rounded to bf16, ≤ 9e-6 (the DOT_CASES bound of
        # test_triton_swav_loss.py: 2e-4).
        loss_rtol = 2e-4 if dtype == torch.bfloat16 and what != backend else 1e-6
        assert_close(torch.stack([r["loss"] for r in results]).mean(), loss, atol=0, rtol=loss_rtol,
                     name=f"loss vs one {what} process")
        for rank, r in enumerate(results):
            assert_close(r["prototypes_grad"], grad_p, **grad_tolerance(dtype, grad_p),
                         name=f"rank {rank} dP vs {what}")
            want_e = local_embeddings(grad_e, rank, setup)
            assert_close(r["embeddings_grad"], want_e, **grad_tolerance(dtype, want_e),
                         name=f"rank {rank} dE vs {what}")

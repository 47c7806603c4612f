"""The Triton kernels compiled on a GPU, at shapes where the launchers take paths the benchmark shapes do not: Sinkhorn
with its rows split over programs (a small batch with a long queue and few prototypes: SwAV's batch-256 recipe),
narrow column blocks at K = 16,000, K = 65,536, ε = 0.01; the SwAV loss with a queue in fp32 and bf16 × fp32; all
against fp64 with the GPU tolerances of benchmarks/swav_head.py (GPU_TOLERANCES, derived there for ex2.approx).

On a CUDA machine: `TRITON_INTERPRET=0 python -m pytest -q tests/test_kernels_gpu.py` (benchmarks/gpu_check.sh runs
it). Elsewhere the same checks run at reduced shapes in Triton's interpreter, the split path forced by a smaller
MIN_CHUNK, so that the checks themselves are tested here.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.swav_head import GPU_TOLERANCES
from kernel_checks import assert_close, fp64_swav_loss, plain_swav_sinkhorn
from kernels import sinkhorn, swav_loss
from kernels._backend import interpreting

sk = importlib.import_module("kernels.sinkhorn")
GPU = torch.cuda.is_available() and not interpreting()
DEVICE = torch.device("cuda" if GPU else "cpu")
if not GPU and not interpreting():
    pytest.skip("needs a CUDA device, or TRITON_INTERPRET=1 for the reduced CPU copy", allow_module_level=True)

# Sinkhorn: rows × prototypes, and the launch path each takes on a 132-SM GPU (reduced copies on CPU).
SINKHORN_CASES = {
    "rows-split": (4096, 3000) if GPU else (100, 64),
    "narrow-columns": (528, 16_000) if GPU else (12, 600),
    "k65k": (256, 65_536) if GPU else (2, 2048),
}
# SwAV loss with a queue: (n_crops, samples per crop, D, K, queue rows per assigned crop).
QUEUE_SHAPE = (8, 64, 128, 3000, 3840) if GPU else (4, 6, 24, 100, 150)


@pytest.fixture(autouse=True)
def split_rows_on_cpu(monkeypatch):
    if not GPU:  # the interpreter's shapes are too small for the GPU's chunk size
        monkeypatch.setattr(sk, "MIN_CHUNK", 16)


def unit_scores(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, 64, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 64, generator=g), dim=1)
    return (z @ c.T).to(DEVICE)


@pytest.mark.parametrize("epsilon", [0.01, 0.05] if GPU else [0.01])
@pytest.mark.parametrize("case", list(SINKHORN_CASES))
def test_sinkhorn_codes_against_fp64(case, epsilon):
    rows, k = SINKHORN_CASES[case]
    cfg = sk.sinkhorn_config(rows, k)
    assert (cfg["chunks"] > 1) == (case == "rows-split"), cfg  # the case takes the path it is named for
    scores = unit_scores(rows, k, seed=rows + k)
    iterations = 10 if GPU else 3
    codes = sinkhorn(scores, epsilon=epsilon, iterations=iterations, backend="triton")
    assert torch.isfinite(codes).all()
    # ex2.approx: ≤ 1e-5 relative per exponential, the potentials' rounding carried over 10 iterations.
    assert_close(codes.cpu().double(), plain_swav_sinkhorn(scores.cpu(), epsilon, iterations), atol=1e-7, rtol=2e-4,
                 name=f"codes ({case}, ε {epsilon})")
    assert_close(codes.sum(dim=1).cpu(), torch.ones(rows), atol=1e-5, rtol=0, name="row sums")


@pytest.mark.parametrize("dtype", ["fp32", "bf16xfp32"])
def test_swav_loss_with_queue_against_fp64(dtype):
    n_crops, b, d, k, length = QUEUE_SHAPE
    assert sk.sinkhorn_config(b + length, k, problems=2)["chunks"] > 1  # Sinkhorn's rows split over programs
    g = torch.Generator().manual_seed(7)
    e_dtype = torch.bfloat16 if dtype == "bf16xfp32" else torch.float32  # training: the projection's bf16 output
    embeddings = (3 * torch.randn(n_crops * b, d, generator=g)).to(DEVICE, e_dtype).requires_grad_()
    prototypes = F.normalize(torch.randn(k, d, generator=g), dim=1).to(DEVICE).requires_grad_()
    queue = F.normalize(torch.randn(2, length, d, generator=g), dim=2).to(DEVICE)
    kw = dict(n_crops=n_crops, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.03, sinkhorn_iterations=3)
    loss = swav_loss(embeddings, prototypes, queue=queue, backend="triton", **kw)
    grads = torch.autograd.grad(2.5 * loss, (embeddings, prototypes))  # grad_output ≠ 1
    e64 = embeddings.detach().double().cpu().requires_grad_()
    p64 = prototypes.detach().double().cpu().requires_grad_()
    want = fp64_swav_loss(e64, p64, n_crops, (0, 1), 0.1, 0.03, 3, queue.double().cpu())
    want_grads = torch.autograd.grad(2.5 * want, (e64, p64))
    loss_rtol, grad_fraction = GPU_TOLERANCES[dtype]  # bf16xfp32: the kernels multiply bf16-rounded prototypes
    assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in grads)
    assert_close(loss.detach().cpu().double(), want.detach(), atol=0, rtol=loss_rtol, name=f"loss ({dtype})")
    for name, got, ref in zip(("dL/dE", "dL/dP"), grads, want_grads):
        assert_close(got.cpu().double(), ref, atol=grad_fraction * ref.abs().max().item(), rtol=0,
                     name=f"{name} ({dtype})")

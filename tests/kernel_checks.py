"""Ground truth and comparison for the kernel tests: plain fp64 implementations of SwAV, independent of `kernels`.

Imported by the test modules as `from kernel_checks import ...`: pytest's default (prepend) import mode puts tests/,
the folder of conftest.py and of the test modules (no __init__.py), on sys.path, and spawned ranks inherit it.
Not collected as tests: the name does not start with `test_`.
"""

import torch


def plain_swav_sinkhorn(scores, epsilon, iterations, dtype=torch.float64):
    """SwAV's published algorithm (exp, divide by total, rows to 1/K, columns to 1/B, × B), computed in `dtype`.

    In fp64, finite for unit-norm scores down to ε = 0.01 (exp(100) ≈ 3e43 fits fp64).
    """
    q = torch.exp(scores.to(dtype) / epsilon).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).T


def fp64_swav_loss(embeddings, prototypes, n_crops, crops_for_assign, temperature, epsilon, iterations, queue=None):
    """The SwAV loss written out crop by crop in fp64 with SwAV's plain Sinkhorn (independent of kernels). With a
    queue (assigned slot x L x D), its rows are appended before Sinkhorn (whose sample count, B + L, includes them)
    and the batch rows' codes kept, as SwAV/VISSL do."""
    z = embeddings.double() / embeddings.double().norm(dim=1, keepdim=True)
    b = len(z) // n_crops
    crop_scores = [z[c * b:(c + 1) * b] @ prototypes.double().T for c in range(n_crops)]
    total = 0.0
    for i, a in enumerate(crops_for_assign):
        with torch.no_grad():
            assign_scores = crop_scores[a]
            if queue is not None:
                zq = queue[i].detach().double() / queue[i].detach().double().norm(dim=1, keepdim=True)
                assign_scores = torch.cat((assign_scores, zq @ prototypes.double().T))
            q = plain_swav_sinkhorn(assign_scores, epsilon, iterations)[:b]
        crop_loss = 0.0
        for v in range(n_crops):
            if v != a:
                crop_loss -= (q * torch.log_softmax(crop_scores[v] / temperature, dim=1)).sum(dim=1).mean()
        total += crop_loss / (n_crops - 1)
    return total / len(crops_for_assign)


# Gradient tolerances of 16-bit inputs, as a fraction of the largest entry of the wanted gradient. The Triton
# backward multiplies G = dL/dS / w and the normalized embeddings rounded to the input type on tensor cores (as
# autocast's matmul backward does), so an entry's error scales with the whole row's gradient, not with its own
# size. Largest seen against fp64 (tests/test_triton_swav_loss.py's grids, test_swav_queue.py's cases): bf16 0.84%,
# fp16 0.066% (fp16 carries 3 more mantissa bits).
GRAD_FRACTION_16BIT = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def grad_tolerance(dtype, want):
    """assert_close's atol and rtol for a gradient of inputs of `dtype` against `want`: 1e-7 and 1e-4 for fp32
    inputs, a fraction of |want|'s largest entry for 16-bit ones (GRAD_FRACTION_16BIT)."""
    if dtype not in GRAD_FRACTION_16BIT:
        return dict(atol=1e-7, rtol=1e-4)
    return dict(atol=GRAD_FRACTION_16BIT[dtype] * want.detach().abs().max().item(), rtol=0.0)


def assert_close(got, want, *, atol, rtol, name):
    """allclose on float64 copies that names the tensor, reports nan/inf mismatches and the first bad indices.

    Returns the largest absolute error (for tests that print what they saw).
    """
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    finite_mismatch = torch.isfinite(got) != torch.isfinite(want)
    if finite_mismatch.any():
        idx = finite_mismatch.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: nan/inf where the other is finite at {idx}: "
                             f"got {[got[tuple(i)].item() for i in idx]}, want {[want[tuple(i)].item() for i in idx]}")
    err = torch.where(torch.isfinite(want), (got - want).abs(), torch.zeros_like(got))
    bad = err > atol + rtol * want.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements outside atol={atol:g}, rtol={rtol:g} "
            f"(max abs error {err.max().item():.3g}); first at {idx}: got {[got[tuple(i)].item() for i in idx]}, "
            f"want {[want[tuple(i)].item() for i in idx]}"
        )
    return err.max().item()

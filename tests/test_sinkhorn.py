"""kernels.sinkhorn: marginals, agreement with SwAV's plain algorithm in fp64, stability, argument errors."""

import types

import pytest
import torch
import torch.nn.functional as F

from kernels import sinkhorn, sinkhorn_reference
from kernels._backend import resolve_backend
from kernel_checks import plain_swav_sinkhorn


def unit_scores(b, k, d=8, seed=0):
    """Cosine similarities of b random unit embeddings to k random unit prototypes, as in SwAV."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T


SHAPES = [(48, 20), (7, 30), (64, 16), (1, 5)]


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize(
    "dtype,out_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
     (torch.float64, torch.float64)],
    ids=["fp32", "bf16", "fp16", "fp64"],
)
def test_rows_sum_to_one_shape_and_dtype(b, k, dtype, out_dtype):
    codes = sinkhorn(unit_scores(b, k).to(dtype))
    assert codes.shape == (b, k) and codes.dtype == out_dtype
    assert torch.isfinite(codes).all() and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(b, dtype=out_dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_matches_plain_swav_in_fp64(b, k, iterations):
    # Unit-norm scores at epsilon 0.05: exp(S / eps) <= e^20, safe for the plain algorithm in fp64.
    scores = unit_scores(b, k, seed=b + k)
    expected = plain_swav_sinkhorn(scores, 0.05, iterations)
    codes = sinkhorn(scores, epsilon=0.05, iterations=iterations)
    torch.testing.assert_close(codes.double(), expected, atol=1e-5, rtol=0)  # fp32 compute: seen ≤ 1e-6
    codes64 = sinkhorn(scores.double(), epsilon=0.05, iterations=iterations)
    torch.testing.assert_close(codes64, expected, atol=1e-12, rtol=0)


def test_prototype_marginals_converge():
    b, k = 48, 16
    scores = unit_scores(b, k, seed=3)

    def imbalance(iterations):
        """Largest relative deviation of a prototype's total mass from B / K."""
        mass = sinkhorn(scores, epsilon=0.05, iterations=iterations).sum(dim=0)
        return ((mass - b / k).abs().max() / (b / k)).item()

    # Finite iterations end on the sample step, so prototype masses are balanced only approximately;
    # the error shrinks with iterations until fp32 noise (seen: 0.5, 0.06, 3e-4, 1e-5 at 3, 10, 50, 200).
    errors = [imbalance(n) for n in (3, 10, 50)]
    assert errors[0] > errors[1] > errors[2]
    assert imbalance(200) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_finite_at_small_epsilon(dtype):
    scores = unit_scores(64, 32, seed=1)
    scores[0, 0] = 1.0  # a sample on a prototype: exp(1 / 0.01) overflows fp32
    scores = scores.to(dtype)
    plain = plain_swav_sinkhorn(scores, 0.01, 3, dtype=torch.float32)
    assert not torch.isfinite(plain).all().item(), "the plain algorithm should break here in fp32"
    codes = sinkhorn(scores, epsilon=0.01, iterations=10)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    # Half-precision inputs are upcast first, so the result equals the fp32 run on the same values.
    torch.testing.assert_close(codes, sinkhorn(scores.float(), epsilon=0.01, iterations=10), atol=0, rtol=0)


def test_sample_far_below_global_max():
    scores = unit_scores(16, 8, seed=2)
    scores[5] = -60.0  # exp(-60 / 0.05) underflows even in fp64: the plain algorithm divides 0 by 0
    assert torch.isnan(plain_swav_sinkhorn(scores, 0.05, 3)).any()
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(16), atol=1e-6, rtol=0)


def test_no_gradient():
    scores = unit_scores(8, 4).requires_grad_()
    assert not sinkhorn(scores).requires_grad


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scores=torch.zeros(6)), r"scores must be 2-D.*\(6,\)"),
        (dict(scores=torch.zeros(2, 3, 4)), r"scores must be 2-D.*\(2, 3, 4\)"),
        (dict(epsilon=0.0), "epsilon must be > 0"),
        (dict(epsilon=-0.05), "epsilon must be > 0"),
        (dict(iterations=0), "iterations must be an integer >= 1"),
    ],
)
def test_argument_errors(kwargs, match):
    args = dict(scores=torch.zeros(4, 3), epsilon=0.05, iterations=3) | kwargs
    scores = args.pop("scores")
    with pytest.raises(ValueError, match=match):
        sinkhorn(scores, **args)
    with pytest.raises(ValueError, match=match):
        sinkhorn_reference(scores, group=None, **args)


def test_backend_dispatch():
    scores = unit_scores(8, 4)
    torch.testing.assert_close(sinkhorn(scores, backend="torch"), sinkhorn(scores, backend="auto"))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        sinkhorn(scores, backend="cuda")
    # "auto" keeps CPU tensors on the reference and sends CUDA tensors (a stand-in here: no GPU) to the Triton
    # kernels, which tests/test_triton_sinkhorn.py checks in Triton's interpreter.
    assert resolve_backend("auto", scores, op="sinkhorn") == "torch"
    assert resolve_backend("auto", scores, types.SimpleNamespace(is_cuda=True), op="sinkhorn") == "triton"

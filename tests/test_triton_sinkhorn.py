"""kernels.sinkhorn, backend="triton" (Triton's interpreter; conftest sets TRITON_INTERPRET=1): codes against the
reference and against SwAV's plain algorithm in fp64, at ε down to 0.01, fp32/bf16/fp16 inputs, looped paths.

Shapes are not multiples of the block sizes (B = 21 rows vs 16-row chunks, K = 300 vs 32-column blocks).
The interpreter costs ~1-2 ms per program instance: keep shapes small.
"""

import importlib
import types

import pytest
import torch
import torch.nn.functional as F

from kernels import sinkhorn, sinkhorn_reference
from kernels._backend import resolve_backend
from kernel_checks import assert_close, plain_swav_sinkhorn

sk = importlib.import_module("kernels.sinkhorn")  # the module (kernels.sinkhorn is also the function's name)

B, K, D = 21, 300, 24


def unit_scores(b, k, d=D, seed=0):
    """Cosine similarities of b random unit embeddings to k random unit prototypes, as in SwAV."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T


# Tolerances (absolute, on codes in [0, 1]; here the largest code is ~0.12). fp32 compute in both the kernels and
# the reference: over this grid seen ≤ 2.5e-7 against each other and ≤ 3.6e-7 against fp64 (the reference itself:
# ≤ 3.5e-7), largest at ε = 0.01 where S/ε ≈ 100 carries the most rounding; rows sum to 1 within 1.8e-7.
# Half-precision inputs are upcast exactly on load, so they compare with the reference on the same rounded values
# (and with fp64 on them) to the same bounds.
ATOL_REF, ATOL_FP64 = 2e-6, 2e-6


@pytest.mark.parametrize("iterations", [3, 10])
@pytest.mark.parametrize("epsilon", [0.01, 0.03, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_codes_match_reference_and_fp64(dtype, epsilon, iterations):
    scores = unit_scores(B, K, seed=int(epsilon * 100) + iterations).to(dtype)
    codes = sinkhorn(scores, epsilon=epsilon, iterations=iterations, backend="triton")
    assert codes.shape == (B, K) and codes.dtype == torch.float32
    assert torch.isfinite(codes).all() and (codes >= 0).all()
    assert_close(codes.sum(dim=1), torch.ones(B), atol=1e-5, rtol=0, name="row sums")
    reference = sinkhorn(scores, epsilon=epsilon, iterations=iterations, backend="torch")
    assert_close(codes, reference, atol=ATOL_REF, rtol=0, name="codes vs reference")
    assert_close(codes, plain_swav_sinkhorn(scores, epsilon, iterations), atol=ATOL_FP64, rtol=0,
                 name="codes vs plain SwAV in fp64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_finite_where_plain_sinkhorn_breaks(dtype):
    scores = unit_scores(B, 40, seed=1)
    scores[0, 0] = 1.0  # a sample on a prototype: exp(1 / 0.01) overflows fp32
    scores[5] = -60.0  # far below every other sample: exp(-60 / 0.01) underflows even fp64
    scores = scores.to(dtype)
    codes = sinkhorn(scores, epsilon=0.01, iterations=10, backend="triton")
    assert torch.isfinite(codes).all()
    assert_close(codes.sum(dim=1), torch.ones(B), atol=1e-5, rtol=0, name="row sums")
    assert_close(codes, sinkhorn_reference(scores, epsilon=0.01, iterations=10, group=None), atol=ATOL_REF, rtol=0,
                 name="codes vs reference")


@pytest.mark.parametrize("min_chunk", [10_000, 16], ids=["one-chunk", "row-chunks"])
def test_looped_paths(monkeypatch, min_chunk):
    """Several row blocks per program and several merge steps per row (small caps force both); with min_chunk = 16
    the rows are split over programs as on a GPU with more SMs than column blocks (column and row passes apart)."""
    monkeypatch.setattr(sk, "MAX_TILE", 512)
    monkeypatch.setattr(sk, "MAX_MERGE", 4)
    monkeypatch.setattr(sk, "MIN_CHUNK", min_chunk)
    b = 40
    cfg = sk.sinkhorn_config(b, K)
    assert cfg["chunk"] > cfg["BLOCK_B"] and cfg["nkb"] > cfg["MERGE"], cfg  # the loops really run more than once
    assert cfg["chunks"] == (1 if min_chunk > b else 2), cfg
    scores = unit_scores(b, K, seed=4)
    codes = sinkhorn(scores, epsilon=0.03, iterations=3, backend="triton")
    assert_close(codes, sinkhorn(scores, epsilon=0.03, iterations=3, backend="torch"), atol=ATOL_REF, rtol=0,
                 name="codes vs reference")


def test_grid_grows_with_rows_and_columns():
    """Column blocks narrow enough for two programs' strips per SM to stay in L2 (then one pass per iteration), as
    many as K needs (K = 65,536: 2,048 blocks); row chunks only where the column blocks alone leave SMs idle."""
    seer = sk.sinkhorn_config(16 + 512, 16_000, problems=2)  # SEER's 16 samples per crop and a queue of 512
    assert seer["BLOCK_K"] == 32 and seer["nkb"] == 500 and seer["chunks"] == 1 and seer["strips_in_l2"], seer
    small = sk.sinkhorn_config(16, 16_000, problems=2)
    assert small["BLOCK_K"] == 256 and small["chunks"] == 1, small
    wide = sk.sinkhorn_config(512, 65_536, problems=2)
    assert wide["nkb"] == 2048 and wide["strips_in_l2"], wide
    queue = sk.sinkhorn_config(32 + 1024, 300, problems=2)  # a small batch with a queue, few prototypes
    assert queue["nkb"] == 10 and queue["chunks"] > 1 and queue["chunk"] * queue["chunks"] >= 1056, queue


def test_k_65536():
    scores = unit_scores(3, 65_536, seed=6)
    codes = sinkhorn(scores, epsilon=0.05, iterations=2, backend="triton")
    assert_close(codes, sinkhorn(scores, epsilon=0.05, iterations=2, backend="torch"), atol=ATOL_REF, rtol=0,
                 name="codes vs reference")


@pytest.mark.parametrize("b,k", [(1, 5), (48, 20)])
def test_tiny_and_transposed_inputs(b, k):
    scores = unit_scores(k, b, seed=b).T  # a non-contiguous view (strides (1, b))
    assert b == 1 or not scores.is_contiguous()
    for iterations in (1, 3):
        codes = sinkhorn(scores, epsilon=0.05, iterations=iterations, backend="triton")
        assert_close(codes, sinkhorn(scores, epsilon=0.05, iterations=iterations, backend="torch"), atol=ATOL_REF,
                     rtol=0, name=f"codes, {iterations} iterations")


def test_no_gradient():
    scores = unit_scores(8, 40).requires_grad_()
    codes = sinkhorn(scores, backend="triton")
    assert not codes.requires_grad


def test_backend_resolution(monkeypatch):
    cpu = unit_scores(4, 8)
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.float32)
    assert resolve_backend("auto", cpu, op="sinkhorn") == "torch"
    assert resolve_backend("auto", cuda_like, op="sinkhorn") == "triton"
    # float64 stays on the reference (the kernels accumulate in fp32) under "auto" and is refused by "triton".
    assert resolve_backend("auto", types.SimpleNamespace(is_cuda=True, dtype=torch.float64), op="sinkhorn") == "torch"
    with pytest.raises(ValueError, match="backend='triton' takes float16, bfloat16 or float32 inputs, got torch.floa"):
        sinkhorn(cpu.double(), backend="triton")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        sinkhorn(cpu, epsilon=0.0, backend="triton")
    # Without the interpreter, CPU tensors cannot run Triton kernels: a clear error instead of "0 active drivers".
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        sinkhorn(cpu, backend="triton")

"""kernels.swav_loss: loss and gradients against an independent fp64 computation, gradcheck, errors."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.swav_head
from kernels import sinkhorn, swav_loss, swav_loss_reference
from kernel_checks import fp64_swav_loss


def make_inputs(n_crops, b, d, k, seed=0, dtype=torch.float32):
    """Unnormalized embeddings (crop-major) and unit-norm prototypes, as SwAV feeds them."""
    g = torch.Generator().manual_seed(seed)
    embeddings = 3 * torch.randn(n_crops * b, d, generator=g, dtype=torch.float64)
    prototypes = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return embeddings.to(dtype).requires_grad_(), prototypes.to(dtype).requires_grad_()


CONFIGS = [  # n_crops, crops_for_assign, b
    pytest.param(2, (0,), 6, id="2crops-assign0"),
    pytest.param(2, (0, 1), 5, id="2crops-assign01"),
    pytest.param(4, (0, 1), 6, id="4crops-assign01"),
    pytest.param(8, (0, 1), 4, id="8crops-assign01"),
    pytest.param(5, (0, 2, 4), 7, id="5crops-assign024"),
    pytest.param(3, (2,), 3, id="3crops-assign2"),
]
# (input dtype, loss rtol, grad atol, grad rtol). The fp64 reference sees the same (rounded) input values,
# so the loss differs only by fp32 compute (seen ≤ 1.2e-7 relative for both dtypes); fp32 gradients were
# seen ≤ 6e-7 off; bf16 gradients come back in bf16 (one ulp ≈ 0.4%; seen ≤ 3.3e-3 absolute).
DTYPES = [
    pytest.param(torch.float32, 1e-6, 2e-6, 1e-4, id="fp32"),
    pytest.param(torch.bfloat16, 1e-6, 1e-4, 1.6e-2, id="bf16"),
]


@pytest.mark.parametrize("n_crops,crops_for_assign,b", CONFIGS)
@pytest.mark.parametrize("dtype,loss_rtol,grad_atol,grad_rtol", DTYPES)
def test_matches_fp64_computation(n_crops, crops_for_assign, b, dtype, loss_rtol, grad_atol, grad_rtol):
    args = dict(temperature=0.1, epsilon=0.05)
    embeddings, prototypes = make_inputs(n_crops, b, d=8, k=12, seed=n_crops, dtype=dtype)
    loss = swav_loss(embeddings, prototypes, n_crops=n_crops, crops_for_assign=crops_for_assign, **args)
    assert loss.shape == () and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (embeddings, prototypes))

    e64, p64 = (t.detach().double().requires_grad_() for t in (embeddings, prototypes))
    expected = fp64_swav_loss(e64, p64, n_crops, crops_for_assign, args["temperature"], args["epsilon"], 3)
    expected_grads = torch.autograd.grad(expected, (e64, p64))

    torch.testing.assert_close(loss.double(), expected, rtol=loss_rtol, atol=0)
    for name, got, want in zip(("embeddings", "prototypes"), grads, expected_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), want, atol=grad_atol, rtol=grad_rtol, msg=lambda m: f"{name}: {m}")


def test_sinkhorn_settings_are_passed_through():
    embeddings, prototypes = make_inputs(3, 6, d=8, k=12, seed=1)
    loss = swav_loss(embeddings, prototypes, n_crops=3, crops_for_assign=(0, 1), temperature=0.2,
                     epsilon=0.03, sinkhorn_iterations=10)
    expected = fp64_swav_loss(embeddings, prototypes, 3, (0, 1), temperature=0.2, epsilon=0.03, iterations=10)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_crops,crops_for_assign", [(3, (0, 1)), (4, (1, 2, 3))])
def test_gradcheck_fp64(monkeypatch, n_crops, crops_for_assign):
    embeddings, prototypes = make_inputs(n_crops, 3, d=4, k=5, seed=7, dtype=torch.float64)
    loss = swav_loss_reference(embeddings, prototypes, n_crops=n_crops, crops_for_assign=crops_for_assign)
    assert loss.dtype == torch.float64
    # The codes are constants for autograd; finite differences would also move them. Freeze them at their
    # values for the unperturbed inputs (sinkhorn is called once per assigned crop, in order).
    scores = F.normalize(embeddings.detach(), dim=1).view(n_crops, 3, 4) @ prototypes.detach().T
    codes = [sinkhorn(scores[a]) for a in crops_for_assign]
    assert all(c.dtype == torch.float64 for c in codes)
    frozen = itertools.cycle(codes)
    monkeypatch.setattr(kernels.swav_head, "sinkhorn_reference", lambda *args, **kwargs: next(frozen))

    def loss_fn(e, p):
        return swav_loss(e, p, n_crops=n_crops, crops_for_assign=crops_for_assign, backend="torch")

    torch.testing.assert_close(loss_fn(embeddings, prototypes), loss)
    assert torch.autograd.gradcheck(loss_fn, (embeddings, prototypes))


def test_uniform_prediction_gives_ln_k():
    k = 12
    embeddings, _ = make_inputs(4, 6, d=8, k=k)
    prototypes = torch.zeros(k, 8, requires_grad=True)  # every prediction uniform, whatever the codes
    loss = swav_loss(embeddings, prototypes, n_crops=4)
    torch.testing.assert_close(loss, torch.tensor(math.log(k)), atol=1e-6, rtol=0)


def test_backend_dispatch():
    embeddings, prototypes = make_inputs(2, 4, d=8, k=12)
    torch.testing.assert_close(swav_loss(embeddings, prototypes, n_crops=2, backend="torch"),
                               swav_loss(embeddings, prototypes, n_crops=2, backend="auto"))
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'gpu'"):
        swav_loss(embeddings, prototypes, n_crops=2, backend="gpu")
    # The Triton backend (run in Triton's interpreter here) is checked in tests/test_triton_swav_loss.py.
    torch.testing.assert_close(swav_loss(embeddings, prototypes, n_crops=2, backend="triton"),
                               swav_loss(embeddings, prototypes, n_crops=2, backend="torch"))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(embeddings=torch.zeros(12)), r"embeddings must be 2-D.*\(12,\)"),
        (dict(prototypes=torch.zeros(5)), r"prototypes must be 2-D.*\(5,\)"),
        (dict(embeddings=torch.zeros(13, 8)), r"13 rows \(shape \(13, 8\)\), not a positive multiple of n_crops=4"),
        (dict(embeddings=torch.zeros(0, 8)), r"embeddings has 0 rows.*n_crops=4"),
        (dict(prototypes=torch.zeros(5, 7)), r"prototypes have D=7 \(shape \(5, 7\)\) but embeddings have D=8"),
        (dict(n_crops=1, embeddings=torch.zeros(3, 8)), "n_crops must be an integer >= 2, got 1"),
        (dict(crops_for_assign=()), "crops_for_assign must name at least one crop"),
        (dict(crops_for_assign=(0, 4)), r"crops_for_assign \(0, 4\) has 4, outside 0..3"),
        (dict(crops_for_assign=(-1,)), r"crops_for_assign \(-1,\) has -1, outside 0..3"),
        (dict(crops_for_assign=(1, 1)), r"crops_for_assign \(1, 1\) contains a duplicate"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(epsilon=-0.05), "epsilon must be > 0"),
        (dict(sinkhorn_iterations=0), "sinkhorn_iterations must be an integer >= 1"),
    ],
)
def test_argument_errors(change, match):
    args = dict(embeddings=torch.zeros(12, 8), prototypes=torch.zeros(5, 8), n_crops=4) | change
    embeddings, prototypes = args.pop("embeddings"), args.pop("prototypes")
    for fn in (swav_loss, swav_loss_reference):
        with pytest.raises(ValueError, match=match):
            fn(embeddings, prototypes, **args)

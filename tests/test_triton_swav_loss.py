"""kernels.swav_loss, backend="triton" (Triton's interpreter; conftest sets TRITON_INTERPRET=1): loss and gradients
against the reference and an independent fp64 computation, fp32/bf16 inputs, ε ∈ {0.01, 0.03, 0.05}, 3 and 10
Sinkhorn iterations, 2 and 3 assigned crops; scaled backward, partial gradients, torch.compile, the engine's head.

Default shape: 6 crops × 7 samples = 42 embeddings (SEER's 2 + 4 crops), D = 24, K = 300: none a multiple of the
block sizes (64-row × 128-column score tiles, 32-wide D steps, 16-sample loss tiles, 32-column Sinkhorn blocks).
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import swav_loss
from kernel_checks import assert_close, fp64_swav_loss, grad_tolerance

head = importlib.import_module("kernels.swav_head")

N_CROPS, B, D, K = 6, 7, 24, 300


def make_inputs(n_crops=N_CROPS, b=B, d=D, k=K, seed=0, dtype=torch.float32):
    """Unnormalized embeddings (crop-major) and unit-norm prototypes, as SwAV feeds them."""
    g = torch.Generator().manual_seed(seed)
    embeddings = 3 * torch.randn(n_crops * b, d, generator=g, dtype=torch.float64)
    prototypes = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return embeddings.to(dtype).requires_grad_(), prototypes.to(dtype).requires_grad_()


def loss_and_grads(embeddings, prototypes, backend, **kwargs):
    loss = swav_loss(embeddings, prototypes, backend=backend, **kwargs)
    return (loss, *torch.autograd.grad(loss, (embeddings, prototypes)))


# Loss rtol per input dtype, against both the reference and fp64; gradients: kernel_checks.grad_tolerance. Seen over
# CASES: fp32: loss ≤ 1.3e-7 relative, gradients ≤ 6.3e-8 absolute (largest entries: ~3e-3 for E, ~5e-2 for P).
# bf16: both backends see the same rounded inputs and compute the loss in fp32, so it agrees as in fp32 (≤ 1.3e-7);
# the gradients: bf16 matmuls in the Triton backward, then rounded to bf16 (≤ 0.84% of the largest entry).
LOSS_RTOL = 1e-6
CASES = [  # dtype, epsilon, iterations, crops_for_assign
    pytest.param(torch.float32, 0.05, 3, (0, 1), id="fp32-eps0.05-it3-assign01"),
    pytest.param(torch.float32, 0.03, 10, (0, 1), id="fp32-eps0.03-it10-assign01"),
    pytest.param(torch.float32, 0.01, 10, (0, 1), id="fp32-eps0.01-it10-assign01"),
    pytest.param(torch.float32, 0.01, 3, (0, 2, 4), id="fp32-eps0.01-it3-assign024"),
    pytest.param(torch.float32, 0.03, 3, (0, 1, 2), id="fp32-eps0.03-it3-assign012"),
    pytest.param(torch.float32, 0.05, 10, (1, 3, 5), id="fp32-eps0.05-it10-assign135"),
    pytest.param(torch.bfloat16, 0.05, 3, (0, 1), id="bf16-eps0.05-it3-assign01"),
    pytest.param(torch.bfloat16, 0.03, 10, (0, 1), id="bf16-eps0.03-it10-assign01"),
    pytest.param(torch.bfloat16, 0.01, 3, (0, 2, 4), id="bf16-eps0.01-it3-assign024"),
]


@pytest.mark.parametrize("dtype,epsilon,iterations,crops_for_assign", CASES)
def test_matches_reference_and_fp64(dtype, epsilon, iterations, crops_for_assign):
    kwargs = dict(n_crops=N_CROPS, crops_for_assign=crops_for_assign, temperature=0.1, epsilon=epsilon,
                  sinkhorn_iterations=iterations)
    embeddings, prototypes = make_inputs(seed=iterations + len(crops_for_assign), dtype=dtype)
    loss, grad_e, grad_p = loss_and_grads(embeddings, prototypes, "triton", **kwargs)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert grad_e.dtype == dtype and grad_p.dtype == dtype
    assert torch.isfinite(grad_e).all() and torch.isfinite(grad_p).all()

    ref = loss_and_grads(embeddings, prototypes, "torch", **kwargs)
    e64, p64 = (t.detach().double().requires_grad_() for t in (embeddings, prototypes))
    loss64 = fp64_swav_loss(e64, p64, N_CROPS, crops_for_assign, 0.1, epsilon, iterations)
    fp64 = (loss64, *torch.autograd.grad(loss64, (e64, p64)))

    for what, want in (("reference", ref), ("fp64", fp64)):
        assert_close(loss, want[0], atol=0, rtol=LOSS_RTOL, name=f"loss vs {what}")
        assert_close(grad_e, want[1], **grad_tolerance(dtype, want[1]), name=f"embeddings grad vs {what}")
        assert_close(grad_p, want[2], **grad_tolerance(dtype, want[2]), name=f"prototypes grad vs {what}")


# What the tensor-core input types cost, against fp64 on the same stored inputs. Interpreted, the kernels round
# their operands exactly as the GPU does (kernels._triton.dot_operand) and multiply them exactly, so this measures
# the operand rounding; not measured here: the order of the GPU's fp32 accumulation. Largest errors seen over
# ε ∈ {0.01, 0.03, 0.05} × {3, 10} iterations × crops (0, 1) and (0, 2, 4), loss relative and gradients as a
# fraction of the largest fp64 gradient entry:
#   bf16 embeddings × fp32 prototypes (prototypes rounded to bf16): loss 8.9e-5, dE 0.68%, dP 0.39%;
#   fp32 with TF32 allowed (both rounded to tf32, to nearest):     loss 8.0e-6, dE 0.066%, dP 0.076%.
# (fp32 without TF32, bf16 × bf16 and fp16 × fp16 multiply unrounded values: the tolerances of CASES above.)
DOT_CASES = [  # inputs, embeddings dtype, prototypes dtype, TF32 allowed, expected dot, loss rtol, gradient fraction
    pytest.param(torch.bfloat16, torch.float32, False, "bf16", 2e-4, 1.5e-2, id="bf16xfp32"),
    pytest.param(torch.float32, torch.float32, True, "tf32", 2e-5, 2e-3, id="fp32-tf32"),
]


@pytest.fixture
def fp32_matmul_precision():
    """set(value): torch's TF32 switch for fp32 matmuls ("tf32" or "ieee"), restored after the test."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    yield lambda value: setattr(matmul, "fp32_precision", value)
    matmul.fp32_precision = before


@pytest.mark.parametrize("epsilon,iterations,crops_for_assign", [(0.01, 10, (0, 1)), (0.05, 3, (0, 2, 4))])
@pytest.mark.parametrize("e_dtype,p_dtype,tf32,dot,loss_rtol,grad_fraction", DOT_CASES)
def test_tensor_core_inputs_vs_fp64(fp32_matmul_precision, e_dtype, p_dtype, tf32, dot, loss_rtol, grad_fraction,
                                    epsilon, iterations, crops_for_assign):
    fp32_matmul_precision("tf32" if tf32 else "ieee")
    assert head.head_config(42, K, D, B, e_dtype, p_dtype)["dot"] == dot
    embeddings, prototypes = make_inputs(seed=iterations + len(crops_for_assign))
    embeddings = embeddings.detach().to(e_dtype).requires_grad_()
    prototypes = prototypes.detach().to(p_dtype).requires_grad_()
    loss, grad_e, grad_p = loss_and_grads(embeddings, prototypes, "triton", n_crops=N_CROPS,
                                          crops_for_assign=crops_for_assign, epsilon=epsilon,
                                          sinkhorn_iterations=iterations)
    assert grad_e.dtype == e_dtype and grad_p.dtype == p_dtype
    e64, p64 = (t.detach().double().requires_grad_() for t in (embeddings, prototypes))
    loss64 = fp64_swav_loss(e64, p64, N_CROPS, crops_for_assign, 0.1, epsilon, iterations)
    want_e, want_p = torch.autograd.grad(loss64, (e64, p64))
    assert_close(loss, loss64, atol=0, rtol=loss_rtol, name=f"{dot} loss vs fp64")
    assert_close(grad_e, want_e, atol=grad_fraction * want_e.abs().max().item(), rtol=0, name=f"{dot} dE vs fp64")
    assert_close(grad_p, want_p, atol=grad_fraction * want_p.abs().max().item(), rtol=0, name=f"{dot} dP vs fp64")


def test_training_path_scaled_noncontiguous_partial():
    """bf16 embeddings × fp32 prototypes (autocast's path): grad_output != 1, column-major inputs, one input frozen.

    Checks the launch decisions it claims to cover: a bf16 G, and the dE matmul split over several prototype slices.
    """
    embeddings, prototypes = make_inputs(seed=9)
    embeddings = embeddings.detach().bfloat16().T.contiguous().T.requires_grad_()
    prototypes = prototypes.detach().T.contiguous().T.requires_grad_()
    assert not embeddings.is_contiguous() and not prototypes.is_contiguous()
    cfg = head.head_config(N_CROPS * B, K, D, B, torch.bfloat16, torch.float32)
    assert cfg["grad_dtype"] == torch.bfloat16
    assert head.grad_embeddings_split(N_CROPS * B, K, D, cfg["grad_embeddings"], 2, torch.device("cpu"))[0] > 1
    kwargs = dict(n_crops=N_CROPS, crops_for_assign=(0, 1), epsilon=0.03, sinkhorn_iterations=3)
    e64, p64 = (t.detach().double().requires_grad_() for t in (embeddings, prototypes))
    want_e, want_p = torch.autograd.grad(-2.5 * fp64_swav_loss(e64, p64, N_CROPS, (0, 1), 0.1, 0.03, 3), (e64, p64))
    # Both gradients, then each alone (frozen prototypes as in SwAV's first iterations, constant embeddings).
    for e, p in ((embeddings, prototypes), (embeddings, prototypes.detach()), (embeddings.detach(), prototypes)):
        leaves = [t for t in (e, p) if t.requires_grad]
        grads = torch.autograd.grad(-2.5 * swav_loss(e, p, backend="triton", **kwargs), leaves)
        for leaf, got in zip(leaves, grads):
            want, name = (want_e, "dE") if leaf is embeddings else (want_p, "dP")
            assert got.dtype == leaf.dtype
            assert_close(got, want, **grad_tolerance(torch.bfloat16, want), name=f"{name} of {len(leaves)} vs fp64")


def test_dot_inputs_follow_dtypes_and_torch_tf32_setting(fp32_matmul_precision):
    from kernels._triton import dot_inputs

    fp32_matmul_precision("ieee")
    assert dot_inputs(torch.bfloat16, torch.float32) == "bf16" and dot_inputs(torch.float32, torch.bfloat16) == "bf16"
    assert dot_inputs(torch.bfloat16, torch.bfloat16) == "bf16" and dot_inputs(torch.float16, torch.float32) == "fp16"
    assert dot_inputs(torch.float32, torch.float32) == "ieee" and dot_inputs(torch.bfloat16, torch.float16) == "ieee"
    fp32_matmul_precision("tf32")
    assert dot_inputs(torch.float32, torch.float32) == "tf32" and dot_inputs(torch.bfloat16, torch.float32) == "bf16"


def test_nearest_prototypes():
    """return_nearest: each assigned crop's argmax prototype, from the scoring pass (3 column blocks at K = 300)."""
    embeddings, prototypes = make_inputs(seed=8)
    kwargs = dict(n_crops=N_CROPS, crops_for_assign=(1, 4), epsilon=0.05, sinkhorn_iterations=3)
    loss, nearest = swav_loss(embeddings, prototypes, backend="triton", return_nearest=True, **kwargs)
    ref_loss, ref_nearest = swav_loss(embeddings, prototypes, backend="torch", return_nearest=True, **kwargs)
    scores = F.normalize(embeddings.detach().double(), dim=1) @ prototypes.detach().double().T
    want = scores.view(N_CROPS, B, K)[[1, 4]].argmax(dim=2)
    assert nearest.dtype == torch.int64 and nearest.shape == (2, B) and not nearest.requires_grad
    assert torch.equal(nearest, want) and torch.equal(ref_nearest, want)
    assert_close(loss, ref_loss, atol=0, rtol=1e-6, name="loss")
    (grad_e,) = torch.autograd.grad(loss, embeddings)  # the second output leaves the gradient alone
    (want_e,) = torch.autograd.grad(swav_loss(embeddings, prototypes, backend="torch", **kwargs), embeddings)
    assert_close(grad_e, want_e, atol=1e-7, rtol=1e-4, name="embeddings grad")


@pytest.mark.parametrize("crops_for_assign", [(0,), (0, 1)])
def test_looped_paths(crops_for_assign):
    """2 crops × 37 samples, D = 40: two 32-sample loss tiles, two score row blocks, two D steps."""
    embeddings, prototypes = make_inputs(n_crops=2, b=37, d=40, seed=5)
    cfg = head.head_config(74, K, 40, 37, torch.float32, torch.float32)
    assert 37 > cfg["loss"]["BLOCK_B"] and 74 > cfg["scores"]["BLOCK_N"] and 40 > cfg["scores"]["BLOCK_D"], cfg
    kwargs = dict(n_crops=2, crops_for_assign=crops_for_assign, epsilon=0.03, sinkhorn_iterations=3)
    got, want = loss_and_grads(embeddings, prototypes, "triton", **kwargs), loss_and_grads(embeddings, prototypes,
                                                                                           "torch", **kwargs)
    for name, g, w, atol in zip(("loss", "embeddings grad", "prototypes grad"), got, want, (0, 1e-7, 1e-7)):
        assert_close(g, w, atol=atol, rtol=1e-4 if atol else 1e-6, name=name)


def test_scaled_loss_and_partial_gradients():
    kwargs = dict(n_crops=N_CROPS, crops_for_assign=(0, 1), epsilon=0.05, sinkhorn_iterations=3)
    embeddings, prototypes = make_inputs(seed=11)
    # A loss scaled before backward (grad_output != 1), as under loss scaling or loss weights.
    for backend in ("triton", "torch"):
        (-2.5 * swav_loss(embeddings, prototypes, backend=backend, **kwargs)).backward()
    # .grad holds triton + torch: equal halves.
    want_e, want_p = (t.grad / 2 for t in (embeddings, prototypes))
    _, grad_e, grad_p = loss_and_grads(embeddings, prototypes, "torch", **kwargs)
    assert_close(want_e, -2.5 * grad_e, atol=1e-7, rtol=1e-4, name="scaled embeddings grad")
    assert_close(want_p, -2.5 * grad_p, atol=1e-7, rtol=1e-4, name="scaled prototypes grad")
    # Only one input needing a gradient (e.g. frozen prototypes, SwAV's first iterations).
    frozen = prototypes.detach()
    loss = swav_loss(embeddings, frozen, backend="triton", **kwargs)
    (only_e,) = torch.autograd.grad(loss, embeddings)
    assert_close(only_e, grad_e, atol=1e-7, rtol=1e-4, name="embeddings grad, frozen prototypes")
    loss = swav_loss(embeddings.detach(), prototypes, backend="triton", **kwargs)
    (only_p,) = torch.autograd.grad(loss, prototypes)
    assert_close(only_p, grad_p, atol=1e-7, rtol=1e-4, name="prototypes grad, constant embeddings")
    with torch.no_grad():  # no gradient written at all
        assert_close(swav_loss(embeddings, prototypes, backend="triton", **kwargs),
                     swav_loss(embeddings, prototypes, backend="torch", **kwargs), atol=0, rtol=1e-6, name="loss")


def test_fp16_noncontiguous():
    embeddings, prototypes = make_inputs(seed=3, dtype=torch.float16)
    embeddings = embeddings.detach().T.contiguous().T.requires_grad_()  # column-major views
    prototypes = prototypes.detach().T.contiguous().T.requires_grad_()
    assert not embeddings.is_contiguous() and not prototypes.is_contiguous()
    kwargs = dict(n_crops=N_CROPS, crops_for_assign=(0, 1), epsilon=0.03, sinkhorn_iterations=3)
    got = loss_and_grads(embeddings, prototypes, "triton", **kwargs)
    want = loss_and_grads(embeddings, prototypes, "torch", **kwargs)
    assert got[1].dtype == torch.float16 and got[2].dtype == torch.float16
    assert_close(got[0], want[0], atol=0, rtol=1e-6, name="loss")
    assert_close(got[1], want[1], **grad_tolerance(torch.float16, want[1]), name="embeddings grad")
    assert_close(got[2], want[2], **grad_tolerance(torch.float16, want[2]), name="prototypes grad")


def test_zero_embedding_row():
    """F.normalize's eps branch: a zero row scores 0 everywhere and gets gradient dZ / 1e-12 (no projection)."""
    embeddings, prototypes = make_inputs(seed=4)
    with torch.no_grad():
        embeddings[3] = 0.0
    kwargs = dict(n_crops=N_CROPS, crops_for_assign=(0, 1), epsilon=0.05, sinkhorn_iterations=3)
    got = loss_and_grads(embeddings, prototypes, "triton", **kwargs)
    want = loss_and_grads(embeddings, prototypes, "torch", **kwargs)
    assert want[1][3].abs().max() > 1e6
    for name, g, w in zip(("loss", "embeddings grad", "prototypes grad"), got, want):
        assert_close(g, w, atol=1e-7, rtol=1e-4, name=name)


def test_caller_autocast_changes_nothing():
    """Under a caller's bf16 autocast the kernels and the backward matmuls keep their own (fp32) precision."""
    embeddings, prototypes = make_inputs(n_crops=2, b=5, seed=6)
    kwargs = dict(n_crops=2, backend="triton", epsilon=0.05, sinkhorn_iterations=3)
    want = loss_and_grads(embeddings, prototypes, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = swav_loss(embeddings, prototypes, **kwargs)
        got = (loss, *torch.autograd.grad(loss, (embeddings, prototypes)))
    for name, g, w in zip(("loss", "embeddings grad", "prototypes grad"), got, want):
        assert g.dtype == w.dtype, name
        assert_close(g, w, atol=0, rtol=0, name=name)


def test_uniform_prediction_gives_ln_k():
    embeddings, _ = make_inputs(n_crops=4, b=6, k=K)
    prototypes = torch.zeros(K, D, requires_grad=True)  # every prediction uniform, whatever the codes
    loss = swav_loss(embeddings, prototypes, n_crops=4, backend="triton")
    assert_close(loss, torch.tensor(math.log(K)), atol=1e-6, rtol=0, name="loss")


def test_torch_compile_of_caller():
    """A compiled function calling the Triton path: the kernels run eagerly (a graph break), values unchanged."""
    embeddings, prototypes = make_inputs(n_crops=2, b=5, seed=2)
    weight = torch.eye(D, requires_grad=True)

    def step(x, w, p):
        return 2.0 * swav_loss(torch.tanh(x @ w), p, n_crops=2, backend="triton", epsilon=0.05, sinkhorn_iterations=3)

    got = step(embeddings, weight, prototypes)
    got_grads = torch.autograd.grad(got, (embeddings, weight, prototypes))
    compiled = torch.compile(step, backend="aot_eager")  # traces like inductor, without its C++ codegen (slow here)
    loss = compiled(embeddings, weight, prototypes)
    grads = torch.autograd.grad(loss, (embeddings, weight, prototypes))
    assert_close(loss, got, atol=0, rtol=1e-6, name="loss")
    for name, g, w in zip(("x", "w", "p"), grads, got_grads):
        assert_close(g, w, atol=1e-7, rtol=1e-5, name=f"grad {name}")


def test_engine_head_runs_triton():
    """The engine's SwAV head with backend="triton" (what "auto" picks on CUDA) trains like the reference."""
    from engine.models.swav import SwAVHead, SwAVLoss

    torch.manual_seed(0)
    features = torch.randn(N_CROPS * B, 16)
    grads = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(1)
        loss_fn = SwAVLoss(crops_for_assign=(0, 1), temperature=0.1, epsilon=0.03, sinkhorn_iterations=3,
                           backend=backend)
        module = SwAVHead(16, [32], D, K, batch_norm=False, loss=loss_fn)
        loss = module(features, n_crops=N_CROPS)
        loss.backward()
        grads[backend] = [loss.detach()] + [p.grad for p in module.parameters()]
    for i, (g, w) in enumerate(zip(grads["triton"], grads["torch"])):
        assert_close(g, w, atol=1e-7, rtol=1e-4, name=f"loss / parameter grad {i}")


def test_benchmark_setups_agree(monkeypatch):
    """benchmarks/swav_head.py's setups compute the same thing for every provider (Triton's run on GPUs only), and its
    GPU check passes here for the two dtypes it checks first."""
    bench = importlib.import_module("benchmarks.swav_head")
    monkeypatch.setitem(bench.SHAPES, "tiny", (N_CROPS, B, D, K))
    monkeypatch.setitem(bench.SETTINGS, "sinkhorn_iterations", 3)
    cpu = torch.device("cpu")
    for op, mode in bench.BENCHMARKS:
        results = {}
        for provider in ("triton", "eager", "swav"):
            if bench.applicable(op, provider):
                fn, grads = bench.setup(op, mode, provider, "tiny", "fp32", cpu)
                out = fn()
                results[provider] = [out[-1] if isinstance(out, tuple) else out] + [t.grad for t in grads]
        for provider, got in results.items():
            # SwAV's exp-domain Sinkhorn rounds differently from the log-domain one: seen ≤ 3e-7 relative.
            for i, (g, w) in enumerate(zip(got, results["eager"])):
                assert_close(g, w, atol=1e-7, rtol=1e-5, name=f"{op}/{mode} {provider} output {i}")
        assert bench.work(op, mode, "tiny", "fp32")["bytes"] > 0
        assert bench.predict(op, mode, "tiny", "bf16xfp32")["predicted_ms"] > 0
    for dtype in ("bf16xfp32", "fp32"):  # autocast on CPU for the reference, as training runs it
        check = bench.gpu_check("tiny", dtype, cpu)
        assert check["pass"], check

"""Benchmark of the SwAV head: Triton kernels vs PyTorch (log-domain reference, SwAV-style exp-domain, compiled).

    seer bench kernels                          # on a GPU: bf16 embeddings × fp32 prototypes (training), then fp32
    seer bench kernels --dtypes bf16xfp32 --shapes large --benchmarks head/full   # one case
    seer bench kernels --shapes seer            # on CPU: the PyTorch providers only, labelled CPU
    python -m benchmarks.swav_head --write-model benchmarks/results/swav_head_h200_model.json   # the model only
    python -m benchmarks.swav_head ...          # the same as `seer bench kernels ...`

What is timed (one setup function per benchmark, the same work for every provider):
  head/forward   the SwAV loss of a multi-crop batch, inputs requiring grad (a training step's forward)
  head/full      the same + backward into embeddings and prototypes
  scores/forward L2-normalize + scores against the prototypes + the temperature-softmax log-sum-exp of every row
  sinkhorn/forward  codes of one assigned crop (B × K), the head's epsilon and iterations
  loss/full      swapped cross-entropy, its log-sum-exps and dL/dS from given scores and Sinkhorn state
Providers: "triton" (kernels.swav_loss / sinkhorn, backend="triton"), "eager" (the log-domain reference,
kernels.swav_loss_reference), "swav" (SwAV's training-script formulation, exp-domain Sinkhorn, written below; head
and sinkhorn only), "compile" (torch.compile of the reference).
Shapes: "seer" = SEER's per-GPU batch, 2×16 + 4×16 = 96 embeddings, D = 256, K = 16,000; "large" = 8 crops × 512
= 4,096 embeddings (SwAV's 2 + 6 crops), D = 256, K = 16,000; "large_k65k" the same with K = 65,536. Settings: ε
0.03, 10 Sinkhorn iterations, T = 0.1, crops 0 and 1 assigned.
Dtypes: "bf16xfp32" = bf16 embeddings × fp32 prototypes, every provider under torch.autocast(bf16): what training
runs; "fp32"; "bf16" (both bf16, no autocast). fp32 matmuls are exact fp32, or TF32 with --tf32 (every provider).

Every record carries the work of the fused algorithm (`work`: tensor-core and FMA FLOPs, HBM bytes, exp/log
evaluations), the least time that work takes on this device's measured ceilings (`roofline_ms`, `bound`: the
ceiling that sets it) and the measured time as a share of it (`pct_of_roofline`), the same yardstick for every
provider; Triton records also carry the model's predicted H200 time (`predicted_h200_ms`, see `predict`). On a
machine without a GPU the Triton kernels would only run in Triton's CPU interpreter (a correctness tool, not a
benchmark): the script then times the PyTorch providers on CPU, labels every record "cpu" and writes no GPU figure.

Results are appended to benchmarks/results/swav_head.json under the current directory, or --out. On CUDA the script
first asserts the Triton path against an fp64 computation at every shape and dtype (`gpu_check`) and stores the
differences and the verdict in each record.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from benchmarks.harness import RESULTS_DIR, append_records, environment, percentiles, script_main
from kernels import sinkhorn_reference, swav_loss_reference
from kernels._triton import L2_BYTES

SHAPES = {  # name: (n_crops, samples per crop, D, K)
    "seer": (6, 16, 256, 16000),
    "large": (8, 512, 256, 16000),
    "large_k65k": (8, 512, 256, 65536),
}
SETTINGS = dict(crops_for_assign=(0, 1), temperature=0.1, epsilon=0.03, sinkhorn_iterations=10)
BENCHMARKS = (("head", "full"), ("head", "forward"), ("scores", "forward"), ("sinkhorn", "forward"), ("loss", "full"))
PROVIDERS = ("triton", "eager", "swav", "compile")
SWAV_STYLE_OPS = ("head", "sinkhorn")  # the "swav" provider writes out SwAV's loss and Sinkhorn, nothing smaller
DTYPES = {  # name: (embeddings dtype, prototypes dtype, under bf16 autocast)
    "bf16xfp32": (torch.bfloat16, torch.float32, True),
    "fp32": (torch.float32, torch.float32, False),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
}

# The H200 the model predicts for, and where each ceiling comes from. "measured": on this workplace's H200 machines
# (/work/.library/device/KINDS.md, 2026-10-28 and 2026-11-04); "datasheet": NVIDIA's H200 SXM figures; "assumed":
# an estimate for the first GPU run to confirm or correct.
H200 = {
    "hbm_bytes_per_s": (4.3e12, "measured: device-to-device copy through PyTorch, bytes read + written"),
    "bf16_flops": (790e12, "measured: 8192^3 bf16 torch.matmul on random data (769-798 TFLOP/s)"),
    "tf32_flops": (395e12, "assumed: half the measured bf16 rate, the datasheet's ratio (495 vs 989 TFLOP/s dense)"),
    "fp32_fma_flops": (67e12, "datasheet: fp32 FMA on CUDA cores"),
    "sfu_per_s": (4.18e12, "datasheet arithmetic: ex2/lg2 at 16 per SM per clock (CUDA guide, cc 9.0) x 132 SMs x "
                           "1.98 GHz (the SM clock seen under load)"),
    "l2_bytes": (L2_BYTES, "datasheet: L2 cache of the GH100 as enabled on H100/H200"),
    "kernel_floor_s": (3e-6, "assumed: least GPU time of a kernel (launch, ramp, drain)"),
    "triton_launch_cpu_s": (12e-6, "assumed: host time of one Triton launch (argument binding, driver call)"),
    "torch_launch_cpu_s": (6e-6, "assumed: host time of one small torch op"),
    "call_cpu_s": (40e-6, "assumed: host time of one swav_loss call outside the launches (checks, autograd); "
                          "twice for forward + backward"),
}
# Matmul rate by the kernels' input type (kernels._triton.dot_inputs); "ieee" is exact fp32 on FMA units.
DOT_RATE = {"bf16": "bf16_flops", "fp16": "bf16_flops", "tf32": "tf32_flops", "ieee": "fp32_fma_flops"}


def make_inputs(shape, dtype, device, seed=0):
    """Unnormalized crop-major embeddings and unit-norm prototypes (dtype: a DTYPES name), both requiring grad."""
    n_crops, b, d, k = SHAPES[shape]
    e_dtype, p_dtype, _ = DTYPES[dtype]
    g = torch.Generator(device="cpu").manual_seed(seed)
    embeddings = 3 * torch.randn(n_crops * b, d, generator=g)
    prototypes = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return (embeddings.to(device, e_dtype).requires_grad_(), prototypes.to(device, p_dtype).requires_grad_())


# ----------------------------------------------------------------------------------------------- the model
def stages(op, mode, shape, dtype):
    """The Triton algorithm's launches for one benchmark, as a list of stages: name, launches (Triton and torch),
    tensor-core and FMA FLOPs, HBM bytes, exp/log evaluations. Block sizes come from the launchers' own config.

    HBM bytes count each kernel's reads and writes once; re-reads that stay in L2 (P and E tiles shared by the
    programs of one wave, the Sinkhorn potentials read by every program) are not counted. Sinkhorn sweeps the scores
    twice per iteration (column then row statistics): HBM sees them once in all where they fit in half the L2, once
    per iteration where a program's column strip stays in L2 between its two sweeps (kernels.sinkhorn's config),
    twice otherwise.
    """
    import triton

    from kernels.sinkhorn import sinkhorn_config
    from kernels.swav_head import grad_embeddings_split, head_config

    n_crops, b, d, k = SHAPES[shape]
    e_dtype, p_dtype, _ = DTYPES[dtype]
    n, na, it = n_crops * b, len(SETTINGS["crops_for_assign"]), SETTINGS["sinkhorn_iterations"]
    es, ps = torch.tensor([], dtype=e_dtype).element_size(), torch.tensor([], dtype=p_dtype).element_size()
    cfg = head_config(n, k, d, b, e_dtype, p_dtype)
    gs = torch.tensor([], dtype=cfg["grad_dtype"]).element_size()
    matmul = 2 * n * k * d
    tc, fma = (matmul, 0) if cfg["dot"] != "ieee" else (0, matmul)
    nkb = triton.cdiv(k, cfg["scores"]["BLOCK_K"])

    def stage(name, triton_launches=0, torch_launches=0, tc_flops=0, fma_flops=0, hbm=0, sfu=0):
        return dict(stage=name, triton_launches=triton_launches, torch_launches=torch_launches, tc_flops=tc_flops,
                    fma_flops=fma_flops, bytes=hbm, sfu=sfu)

    def sinkhorn_passes(problems):
        sk = sinkhorn_config(b, k, problems)
        per_pass = problems * b * k
        if per_pass * 4 <= H200["l2_bytes"][0] / 2:  # all scores stay in L2: HBM sees them once
            sweeps = 1
        else:  # a column-block strip stays in L2 between its two sweeps, or every sweep reaches HBM
            sweeps = it * (1 if sk["strips_in_l2"] else 2)
        partials = problems * b * sk["nkb"] * 2  # the row partials, written by the row pass, read by the row merge
        return stage("sinkhorn passes", triton_launches=it * (2 if sk["chunks"] == 1 else 3),
                     hbm=(sweeps * per_pass + it * (2 * partials + problems * (2 * b + k))) * 4,
                     sfu=it * (2 * per_pass + partials // 2))

    scores = [stage("scores", triton_launches=1, tc_flops=tc, fma_flops=fma,
                    hbm=n * d * es + k * d * ps + n * k * 4 + 3 * n * nkb * 4, sfu=n * k + n * nkb),
              stage("log-sum-exp of the partials", torch_launches=1, hbm=n * nkb * 4, sfu=n * nkb)]
    lc = cfg["loss"]
    loss_programs = triton.cdiv(b, lc["BLOCK_B"]) * triton.cdiv(k, lc["BLOCK_K"])
    # Every benchmark's loss writes G (the head's forward runs on inputs that require grad).
    loss = [stage("loss and G", triton_launches=1, hbm=n * k * (4 + gs), sfu=(2 * na + n_crops) * b * k),
            stage("sum of loss partials", torch_launches=1, hbm=loss_programs * 4)]
    split, _ = grad_embeddings_split(n, k, d, cfg["grad_embeddings"], gs, torch.device("meta"))
    backward = [stage("autograd seed", torch_launches=1),
                stage("G @ P partials", triton_launches=1, tc_flops=tc, fma_flops=fma,
                      hbm=n * k * gs + k * d * ps + split * n * d * 4),
                stage("normalization backward", triton_launches=1,
                      hbm=split * n * d * 4 + 2 * n * d * es + n * d * gs),
                stage("Gt @ Z", triton_launches=1, tc_flops=tc, fma_flops=fma,
                      hbm=n * k * gs + n * d * gs + k * d * ps)]
    if op == "head":
        return scores + [sinkhorn_passes(na)] + loss + (backward if mode == "full" else [])
    if op == "scores":
        return scores
    if op == "sinkhorn":
        return [stage("row0 index", torch_launches=1), sinkhorn_passes(1),
                stage("codes", triton_launches=1, hbm=2 * b * k * 4, sfu=b * k)]
    if op == "loss":  # the benchmark computes the log-sum-exps of the given scores inside the timed region
        return [stage("log-sum-exp of S/T", torch_launches=1, hbm=n * k * 4, sfu=n * k)] + loss
    raise ValueError(op)


def ceilings(params=H200):
    return {name: value for name, (value, _) in params.items()}


def stage_seconds(s, c, dot):
    """(GPU seconds of one stage, the ceiling that sets it): the slowest of its matmuls, HBM traffic and exp/log
    evaluations (assumed to overlap), at least the kernel floor per launch."""
    terms = {"tensor cores": s["tc_flops"] / c[DOT_RATE[dot]], "fp32 FMA": s["fma_flops"] / c["fp32_fma_flops"],
             "HBM": s["bytes"] / c["hbm_bytes_per_s"], "exp/log (SFU)": s["sfu"] / c["sfu_per_s"],
             "launch floor": (s["triton_launches"] + s["torch_launches"]) * c["kernel_floor_s"]}
    bound = max(terms, key=terms.get)
    return terms[bound], bound


def predict(op, mode, shape, dtype, params=H200):
    """Predicted time of the Triton provider: the GPU's time (stages one after another) or the host's time to issue
    the launches, whichever is longer (launches are asynchronous, so the GPU runs behind the host or waits)."""
    from kernels.swav_head import head_config

    n_crops, b, d, k = SHAPES[shape]
    e_dtype, p_dtype, _ = DTYPES[dtype]
    dot = head_config(n_crops * b, k, d, b, e_dtype, p_dtype)["dot"]
    c = ceilings(params)
    rows = []
    for s in stages(op, mode, shape, dtype):
        seconds, bound = stage_seconds(s, c, dot)
        rows.append(dict(s, predicted_us=round(seconds * 1e6, 2), bound=bound))
    gpu = sum(r["predicted_us"] for r in rows) * 1e-6
    calls = (2 if mode == "full" else 1) if op == "head" else 0
    host = (sum(r["triton_launches"] for r in rows) * c["triton_launch_cpu_s"]
            + sum(r["torch_launches"] for r in rows) * c["torch_launch_cpu_s"] + calls * c["call_cpu_s"])
    return dict(stages=rows, gpu_ms=gpu * 1e3, host_ms=host * 1e3, predicted_ms=max(gpu, host) * 1e3,
                limited_by="GPU" if gpu >= host else "host launches", dot=dot)


def work(op, mode, shape, dtype):
    """Total work of the fused algorithm (the yardstick of every provider)."""
    totals = dict(tc_flops=0, fma_flops=0, bytes=0, sfu=0)
    for s in stages(op, mode, shape, dtype):
        for key in totals:
            totals[key] += s[key]
    return totals


def roofline(op, mode, shape, dtype, c, dot):
    """(Least time of the work on ceilings c if every resource overlapped perfectly, the ceiling that sets it)."""
    w = work(op, mode, shape, dtype)
    return stage_seconds(dict(w, triton_launches=0, torch_launches=0), c, dot)


def model_record(params=H200) -> dict:
    """Predicted H200 times of every benchmark's Triton provider, with the stages and ceilings behind them."""
    from kernels.swav_head import head_config

    cases = []
    for shape, (n_crops, b, d, k) in SHAPES.items():
        for dtype, (e_dtype, p_dtype, _) in DTYPES.items():
            dot = head_config(n_crops * b, k, d, b, e_dtype, p_dtype)["dot"]
            for op, mode in BENCHMARKS:
                seconds, bound = roofline(op, mode, shape, dtype, ceilings(params), dot)
                cases.append(dict(op=op, mode=mode, shape=shape, dtype=dtype, dims=dict(zip(
                    ("n_crops", "samples_per_crop", "D", "K"), SHAPES[shape])), work=work(op, mode, shape, dtype),
                    roofline_ms=seconds * 1e3, roofline_bound=bound, **predict(op, mode, shape, dtype, params)))
    return dict(device="NVIDIA H200 (model, not a measurement)", settings=SETTINGS,
                ceilings={name: dict(value=value, source=source) for name, (value, source) in params.items()},
                note="fp32 rows assume torch's default (exact fp32 matmuls on FMA units); predicted_ms = max(gpu_ms, "
                     "host_ms); a stage's time is its slowest ceiling, ceilings assumed to overlap within a kernel",
                cases=cases)


# ----------------------------------------------------------------------------------------------- providers
def swav_style_sinkhorn(scores, epsilon, iterations):
    """SwAV's Sinkhorn-Knopp as its training script computes it: in the exp domain, on one process, in fp32."""
    q = torch.exp(scores.float() / epsilon).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def swav_style_loss(embeddings, prototypes, *, n_crops, crops_for_assign, temperature, epsilon, sinkhorn_iterations):
    """SwAV's training-script loss, crop by crop: normalized embeddings through the prototypes, codes of each
    assigned crop by the exp-domain Sinkhorn without gradient, cross-entropy of every other crop's prediction."""
    b = embeddings.shape[0] // n_crops
    output = F.normalize(embeddings, dim=1) @ prototypes.t()
    loss = 0
    for a in crops_for_assign:
        with torch.no_grad():
            q = swav_style_sinkhorn(output[a * b:(a + 1) * b].detach(), epsilon, sinkhorn_iterations)
        crop_loss = 0
        for v in range(n_crops):
            if v != a:
                log_p = F.log_softmax(output[v * b:(v + 1) * b] / temperature, dim=1)
                crop_loss = crop_loss - torch.mean(torch.sum(q * log_p, dim=1))
        loss = loss + crop_loss / (n_crops - 1)
    return loss / len(crops_for_assign)


def reference_scores(embeddings, prototypes, temperature):
    """The reference's scoring lines (kernels.swav_head.swav_loss_reference) and its softmax statistics."""
    z = F.normalize(embeddings.float(), dim=1)
    scores = z @ prototypes.float().T
    return scores, torch.logsumexp(scores / temperature, dim=1)


def reference_swapped_ce(scores, codes, n_crops, crops_for_assign, temperature):
    """The reference's cross-entropy lines (kernels.swav_head.swav_loss_reference) given scores and codes."""
    log_p = torch.log_softmax(scores.view(n_crops, -1, scores.shape[1]) / temperature, dim=2)
    terms = [-(q * log_p[[v for v in range(n_crops) if v != a]]).sum(dim=2).mean()
             for a, q in zip(crops_for_assign, codes)]
    return torch.stack(terms).mean()


def _backward(loss):
    loss.backward()
    return loss.detach()


def applicable(op, provider):
    return provider != "swav" or op in SWAV_STYLE_OPS


def setup(op, mode, provider, shape, dtype, device):
    """A no-argument callable running one benchmark, and the tensors whose .grad it fills (reset between calls).

    The callable returns what it computed (loss, log-sum-exps or codes), so that providers can be compared.
    dtype: a DTYPES name; "bf16xfp32" runs the callable under bf16 autocast.
    """
    fn, grads = _setup(op, mode, provider, shape, dtype, device)
    if not DTYPES[dtype][2]:
        return fn, grads

    def under_autocast():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()
    return under_autocast, grads


def _setup(op, mode, provider, shape, dtype, device):
    import triton

    n_crops, b, d, k = SHAPES[shape]
    embeddings, prototypes = make_inputs(shape, dtype, device)
    kw = dict(n_crops=n_crops, **SETTINGS)
    maybe_compile = torch.compile if provider == "compile" else (lambda f: f)
    head = kernels.swav_head
    if op == "head":
        if provider == "triton":
            def loss_fn(e, p):
                return kernels.swav_loss(e, p, backend="triton", **kw)
        elif provider == "swav":
            def loss_fn(e, p):
                return swav_style_loss(e, p, **kw)
        else:
            loss_fn = maybe_compile(lambda e, p: swav_loss_reference(e, p, **kw))
        if mode == "forward":
            return (lambda: loss_fn(embeddings, prototypes)), []
        return (lambda: _backward(loss_fn(embeddings, prototypes))), [embeddings, prototypes]
    if op == "scores":
        e, p = embeddings.detach(), prototypes.detach()
        if provider == "triton":
            cfg = head.head_config(n_crops * b, k, d, b, e.dtype, p.dtype)["scores"]
            n, nkb = n_crops * b, triton.cdiv(k, cfg["BLOCK_K"])
            out = torch.empty(n, k, device=device)
            part = torch.empty(n, nkb, device=device)
            best = torch.empty(2, n, nkb, device=device)
            rinv = torch.empty(n, device=device)

            def run():
                head._swav_scores_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), nkb)](
                    out, out.stride(0), part, best, rinv, e, e.stride(0), e.stride(1), p, p.stride(0), p.stride(1),
                    n, k, d, nkb, 1.0 / SETTINGS["temperature"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                    BLOCK_D=cfg["BLOCK_D"], DOT=cfg["DOT"], num_warps=cfg["num_warps"])
                return torch.logsumexp(part, dim=1)
            return run, []
        fn = maybe_compile(reference_scores)
        return (lambda: fn(e, p, SETTINGS["temperature"])[1]), []
    if op == "sinkhorn":
        with torch.no_grad():
            crop_scores = reference_scores(embeddings, prototypes, SETTINGS["temperature"])[0][:b].contiguous()
        eps, its = SETTINGS["epsilon"], SETTINGS["sinkhorn_iterations"]
        if provider == "triton":
            return (lambda: kernels.sinkhorn(crop_scores, epsilon=eps, iterations=its, backend="triton")), []
        if provider == "swav":
            return (lambda: swav_style_sinkhorn(crop_scores, eps, its)), []
        fn = maybe_compile(lambda s: sinkhorn_reference(s, epsilon=eps, iterations=its, group=None))
        return (lambda: fn(crop_scores)), []
    if op == "loss":
        with torch.no_grad():
            scores = reference_scores(embeddings, prototypes, SETTINGS["temperature"])[0]
        if provider == "triton":
            na, n = len(SETTINGS["crops_for_assign"]), n_crops * b
            cfg = head.head_config(n, k, d, b, embeddings.dtype, prototypes.dtype)
            table = head._crop_table(device, n_crops, b, SETTINGS["crops_for_assign"])
            log_u, rstat, _ = head.sinkhorn_potentials(scores, table[:na], b, epsilon=SETTINGS["epsilon"],
                                                       iterations=SETTINGS["sinkhorn_iterations"], group=None)
            lc = cfg["loss"]
            grid = (triton.cdiv(b, lc["BLOCK_B"]), triton.cdiv(k, lc["BLOCK_K"]))
            grad = torch.empty(n, k, device=device, dtype=cfg["grad_dtype"])
            part = torch.empty(grid[0] * grid[1], device=device)

            def run():  # writes G to its own buffer, so that every call sees the same scores
                lse = torch.logsumexp(scores / SETTINGS["temperature"], dim=1)
                head._swav_loss_kernel[grid](
                    grad, grad.stride(0), part, scores, scores.stride(0), lse, log_u, rstat, table, b, k, b,
                    n_crops, na, 1.0 / SETTINGS["epsilon"], 1.0 / SETTINGS["temperature"],
                    head.loss_weight(b, n_crops, na), BLOCK_B=lc["BLOCK_B"], BLOCK_K=lc["BLOCK_K"],
                    WRITE_GRAD=True, DOT=cfg["dot"], num_warps=lc["num_warps"])
                return part.sum()
            return run, []
        codes = [sinkhorn_reference(scores.view(n_crops, b, k)[a], epsilon=SETTINGS["epsilon"],
                                    iterations=SETTINGS["sinkhorn_iterations"], group=None)
                 for a in SETTINGS["crops_for_assign"]]
        leaf = scores.clone().requires_grad_()
        fn = maybe_compile(lambda s: reference_swapped_ce(s, codes, n_crops, SETTINGS["crops_for_assign"],
                                                          SETTINGS["temperature"]))
        return (lambda: _backward(fn(leaf))), [leaf]
    raise ValueError(op)


# ----------------------------------------------------------------------------------------------- timing
def time_gpu(fn, grads):
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grads or None,
                                            quantiles=[0.2, 0.5, 0.8])
    return p20, p50, p80


def time_cpu(fn, grads, budget_s=20.0, max_reps=30):
    for t in grads:
        t.grad = None
    fn()  # warm-up (and torch.compile's compilation)
    samples, start = [], time.perf_counter()
    while len(samples) < max_reps and (len(samples) < 3 or time.perf_counter() - start < budget_s):
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return percentiles(samples)


def peak_memory_mb(fn, grads, device):
    if device.type != "cuda":
        return None
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def measured_ceilings(device):
    """This GPU's HBM bandwidth (a 1 GiB device-to-device copy, bytes read + written per second) and bf16 matmul
    rate (8192^3 on random data), measured in the run; the other ceilings from H200 (the model's)."""
    import triton.testing

    src = torch.empty(2**28, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ a, warmup=10, rep=100)
    c = ceilings()
    c.update(hbm_bytes_per_s=2 * src.numel() * 4 / (ms * 1e-3), bf16_flops=2 * 8192**3 / (mm_ms * 1e-3))
    return c


# ----------------------------------------------------------------------------------------------- checks
# Triton on the GPU against an fp64 computation of the same stored inputs: (loss rtol, gradient atol as a fraction
# of the largest fp64 entry) per dtype. The matmul inputs' share is what the interpreted tests measure
# (benchmarks/README.md: bf16xfp32 loss 8.9e-5, gradients 0.84% of the largest entry; tf32 8.0e-6 and 0.076%;
# exact fp32 1.3e-7); on the GPU tl.exp is ex2.approx(x·log2 e): the product's rounding (|x| up to ~2/ε + the
# potentials, ≤ 100 here: 100 × 1.44 × 2^-24 ≈ 9e-6 absolute in the exponent) and ex2.approx's own ≤ 2^-22 relative
# error put ≤ 1e-5 relative on every code and softmax entry, and the fp32 sums run in another order; hence 5e-5 on
# the loss and 1e-4 of the largest gradient entry beyond the matmul inputs' share.
GPU_TOLERANCES = {"bf16xfp32": (3e-4, 1.5e-2), "bf16": (5e-5, 1.5e-2), "fp32": (5e-5, 1e-4),
                  "fp32+tf32": (5e-5, 2e-3)}


def gpu_check(shape, dtype, device):
    """Triton vs fp64 on this device, asserted: loss and both gradients within GPU_TOLERANCES, everything finite.

    Returns the differences (and the reference's, for context) and "pass"; never raises for a mismatch, so that a
    run goes on to the other cases (a failure is in the record and the summary line).
    """
    from kernels._triton import tf32_allowed

    name = "fp32+tf32" if dtype == "fp32" and tf32_allowed() else dtype
    loss_rtol, grad_fraction = GPU_TOLERANCES[name]
    e, p = make_inputs(shape, dtype, device, seed=1)
    kw = dict(n_crops=SHAPES[shape][0], **SETTINGS)
    e64, p64 = (t.detach().double().requires_grad_() for t in (e, p))
    want = swav_loss_reference(e64, p64, **kw)
    want_e, want_p = torch.autograd.grad(want, (e64, p64))
    out = dict(tolerance=dict(inputs=name, loss_rtol=loss_rtol, grad_fraction_of_max=grad_fraction))
    for backend in ("triton", "torch"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=DTYPES[dtype][2]):
            loss = kernels.swav_loss(e, p, backend=backend, **kw)
        grad_e, grad_p = torch.autograd.grad(loss, (e, p))
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_e).all() and torch.isfinite(grad_p).all())
        diffs = dict(loss=loss.item(), loss_rel_diff=abs(loss.item() - want.item()) / abs(want.item()),
                     grad_embeddings_diff_fraction=((grad_e.double() - want_e).abs().max() / want_e.abs().max()).item(),
                     grad_prototypes_diff_fraction=((grad_p.double() - want_p).abs().max() / want_p.abs().max()).item(),
                     finite=finite)
        out["triton" if backend == "triton" else "reference"] = diffs
    t = out["triton"]
    out["loss_fp64"] = want.item()
    out["pass"] = bool(t["finite"] and t["loss_rel_diff"] <= loss_rtol and t["grad_embeddings_diff_fraction"] <=
                       grad_fraction and t["grad_prototypes_diff_fraction"] <= grad_fraction)
    return out


# ----------------------------------------------------------------------------------------------- the script
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="default: all on GPU, seer on CPU")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: bf16xfp32 fp32 on GPU, fp32 on CPU")
    parser.add_argument("--benchmarks", nargs="+", default=[f"{o}/{m}" for o, m in BENCHMARKS],
                        choices=[f"{o}/{m}" for o, m in BENCHMARKS])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--no-check", action="store_true", help="skip the GPU correctness check")
    parser.add_argument("--tf32", action="store_true",
                        help="let fp32 matmuls use TF32 (torch.set_float32_matmul_precision('high')), every provider")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 gives stable CPU numbers)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "swav_head.json",
                        help="JSON file records are appended to (default: benchmarks/results/swav_head.json under "
                             "the current directory)")
    parser.add_argument("--write-model", type=Path, default=None, metavar="FILE",
                        help="write the model's predicted H200 times to FILE (JSON) and time nothing")
    parser.add_argument("--fail-on-check", action="store_true",
                        help="exit with status 1 after the run if a GPU correctness check failed")
    parser.add_argument("--summarize", type=Path, default=None, metavar="FILE",
                        help="print the head/full comparison of FILE's GPU records against the targets, time nothing")


def run(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Check (on CUDA), time and record every benchmark × provider × shape × dtype; progress on stderr, a JSON line
    on stdout. `argv`: the arguments after `seer bench kernels`, stored with each record as its command."""
    command = "seer bench kernels " + shlex.join(argv)
    if args.write_model:
        record = dict(command="python -m benchmarks.swav_head " + shlex.join(argv), **model_record())
        args.write_model.parent.mkdir(parents=True, exist_ok=True)
        args.write_model.write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({"model": str(args.write_model), "cases": len(record["cases"])}))
        return []
    if args.summarize:
        print(summary(json.loads(args.summarize.read_text())))
        return []
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    providers = list(args.providers)
    if not on_gpu:
        torch.set_num_threads(args.threads)
        print("NO GPU: no GPU figure exists from this run, and none is written. The Triton kernels would only run in "
              "Triton's CPU interpreter, which is no benchmark; timing the PyTorch providers on CPU instead, every "
              "record labelled CPU.", file=sys.stderr, flush=True)
        providers = [p for p in providers if p != "triton"]
    shapes = args.shapes or (list(SHAPES) if on_gpu else ["seer"])
    dtypes = args.dtypes or (["bf16xfp32", "fp32"] if on_gpu else ["fp32"])
    env = environment(device)
    c = measured_ceilings(device) if on_gpu else None
    if on_gpu:
        env.update(measured_hbm_gbps=round(c["hbm_bytes_per_s"] / 1e9, 1),
                   measured_bf16_tflops=round(c["bf16_flops"] / 1e12, 1))

    records = []
    for shape in shapes:
        for dname in dtypes:
            check = None
            if on_gpu and not args.no_check:
                try:
                    check = gpu_check(shape, dname, device)
                except Exception as exc:  # recorded; the timings still run
                    check = {"pass": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"CHECK {'PASS' if check['pass'] else 'FAIL'} {shape} {dname}: {json.dumps(check)}",
                      file=sys.stderr, flush=True)
            for name in args.benchmarks:
                op, mode = name.split("/")
                w = work(op, mode, shape, dname)
                prediction = predict(op, mode, shape, dname)
                for provider in providers:
                    if not applicable(op, provider):
                        continue
                    torch._dynamo.reset()
                    try:
                        fn, grads = setup(op, mode, provider, shape, dname, device)
                        p20, p50, p80 = (time_gpu if on_gpu else time_cpu)(fn, grads)
                        mem = peak_memory_mb(fn, grads, device)
                        error = None
                    except torch.cuda.OutOfMemoryError as exc:  # record and go on with the sweep
                        p20 = p50 = p80 = mem = None
                        error = f"OOM: {exc}"[:300]
                    rec = dict(benchmark="swav_head", op=op, mode=mode, provider=provider, shape=shape,
                               dims=dict(zip(("n_crops", "samples_per_crop", "D", "K"), SHAPES[shape])),
                               settings=SETTINGS, dtype=dname, ms_p20=p20, ms_p50=p50, ms_p80=p80, work=w,
                               peak_memory_mb=mem, check=check, error=error, command=command, **env)
                    if on_gpu and p50:
                        seconds, bound = roofline(op, mode, shape, dname, c, prediction["dot"])
                        rec.update(roofline_ms=seconds * 1e3, bound=bound,
                                   pct_of_roofline=round(100 * seconds * 1e3 / p50, 1),
                                   tflops=round((w["tc_flops"] + w["fma_flops"]) / (p50 * 1e-3) / 1e12, 1),
                                   gbps=round(w["bytes"] / (p50 * 1e-3) / 1e9, 1))
                        if provider == "triton":
                            rec.update(predicted_h200_ms=prediction["predicted_ms"],
                                       measured_over_predicted=round(p50 / prediction["predicted_ms"], 2))
                    records.append(rec)
                    append_records(args.out, [rec])  # record by record: a timeout keeps what ran
                    label = "GPU" if on_gpu else "CPU"
                    ms = f"{p50:9.3f} ms" if p50 else "   failed"
                    extra = (f"  {rec['pct_of_roofline']}% of the {rec['bound']} roofline"
                             if rec.get("pct_of_roofline") else "")
                    if rec.get("predicted_h200_ms"):
                        extra += f"  (predicted {rec['predicted_h200_ms']:.3f} ms)"
                    print(f"[{label}] {shape:10} {dname:9} {name:16} {provider:7} {ms}{extra}", file=sys.stderr,
                          flush=True)
    print(json.dumps({"out": str(args.out), "records": len(records)}))
    failed = sorted({(r["shape"], r["dtype"]) for r in records if r["check"] and not r["check"]["pass"]})
    if args.fail_on_check and failed:
        raise SystemExit(f"GPU correctness check failed for {failed}")
    return records


# Targets of issue 14 on an H200 (a benchmark's, not a test's): head/full in bf16 x fp32 at least 3x SwAV's eager
# formulation and 1.5x torch.compile of the reference, and within 1.5x of the model's prediction.
TARGETS = dict(vs_swav=3.0, vs_compile=1.5, of_predicted=1.5)


def summary(records: list[dict]) -> str:
    """One line per shape and dtype of GPU head/full records: the providers' medians, Triton's speed-ups, its
    measured/predicted ratio and which targets hold (latest record of each provider)."""
    latest = {}
    for r in records:
        if r.get("device_kind") == "cuda" and (r["op"], r["mode"]) == ("head", "full") and r["ms_p50"]:
            latest[(r["shape"], r["dtype"], r["provider"])] = r
    lines = []
    for shape, dtype in sorted({key[:2] for key in latest}):
        ms = {p: latest[(shape, dtype, p)]["ms_p50"] for p in PROVIDERS if (shape, dtype, p) in latest}
        if "triton" not in ms:
            continue
        triton = latest[(shape, dtype, "triton")]
        parts = [f"{p} {v:.3f} ms" for p, v in ms.items()]
        verdicts = []
        for name, other in (("vs_swav", "swav"), ("vs_compile", "compile")):
            if other in ms:
                speedup = ms[other] / ms["triton"]
                verdicts.append(f"{speedup:.2f}x {other} ({'met' if speedup >= TARGETS[name] else 'MISSED'} "
                                f">= {TARGETS[name]}x)")
        ratio = triton.get("measured_over_predicted")
        if ratio:
            verdicts.append(f"measured/predicted {ratio:.2f} ({'met' if ratio <= TARGETS['of_predicted'] else 'MISSED'}"
                            f" <= {TARGETS['of_predicted']})")
        check = triton.get("check") or {}
        verdicts.append(f"check {'PASS' if check.get('pass') else 'FAIL' if check else 'not run'}")
        lines.append(f"head/full {shape} {dtype}: " + ", ".join(parts) + " | " + "; ".join(verdicts))
    return "\n".join(lines) or "no GPU head/full records"


def main(argv: list[str] | None = None) -> None:
    script_main("benchmarks.swav_head", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()

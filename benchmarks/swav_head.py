"""Benchmark of the SwAV head: Triton kernels vs the PyTorch reference, eager and under torch.compile.

    seer bench kernels                          # on a GPU: every op, provider and shape, fp32
    seer bench kernels --dtypes fp32 bf16       # embeddings and prototypes in bf16 too
    seer bench kernels --shapes seer            # on CPU: the reference only (eager vs compile), labelled CPU
    python -m benchmarks.swav_head ...          # the same, without `seer`

What is timed (one setup function per benchmark; providers "triton", "eager" = the reference, "compile" =
torch.compile(reference)):
  head/forward   kernels.swav_loss on inputs that require grad (the forward of a training step)
  head/full      the same + backward into embeddings and prototypes
  scores/forward L2-normalize + scores against the prototypes (+ the temperature-softmax statistics)
  sinkhorn/forward  codes of one assigned crop (B × K), the head's setting of epsilon and iterations
  loss/full      swapped cross-entropy and dL/dS from given scores and Sinkhorn state (no scoring, no Sinkhorn)
Shapes: "seer" = SEER's per-GPU batch, 2×16 + 4×16 = 96 embeddings, D = 256, K = 16,000, 10 iterations, eps 0.03;
"large" = 8 crops × 512 = 4,096 embeddings (SwAV's 2 + 6 crops), D = 256, K = 16,000, same settings.

GB/s is effective bandwidth: the bytes the fused Triton algorithm must move at least (`bytes_model`, written into
every record) divided by the median time, for every provider alike; "% of HBM peak" compares that with the GPU's
published peak and with a device-to-device copy measured in the same run. On a machine without a GPU, the Triton
kernels can only run in Triton's CPU interpreter (a correctness tool, not a benchmark): the script then measures
the reference eager vs torch.compile on CPU, labels every record "cpu", and writes no GPU figure.

Results are appended to benchmarks/results/swav_head.json under the current directory, or --out (one record per
benchmark × provider × shape × dtype, with the command, device, commit and versions in the record). On CUDA the
script first checks the Triton path against the reference at every shape (loss and gradients) and records the
differences.
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

SHAPES = {  # name: (n_crops, samples per crop, D, K)
    "seer": (6, 16, 256, 16000),
    "large": (8, 512, 256, 16000),
}
SETTINGS = dict(crops_for_assign=(0, 1), temperature=0.1, epsilon=0.03, sinkhorn_iterations=10)
BENCHMARKS = (("head", "forward"), ("head", "full"), ("scores", "forward"), ("sinkhorn", "forward"), ("loss", "full"))
PROVIDERS = ("triton", "eager", "compile")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Published HBM bandwidth (bytes/s) by device-name fragment; "% of HBM peak" also compares with a copy measured
# in the run, so an unlisted GPU still gets a figure.
HBM_PEAK = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
            "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12}


def make_inputs(shape, dtype, device, seed=0):
    """Unnormalized crop-major embeddings and unit-norm prototypes, both requiring grad."""
    n_crops, b, d, k = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(seed)
    embeddings = 3 * torch.randn(n_crops * b, d, generator=g)
    prototypes = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return (embeddings.to(device, dtype).requires_grad_(), prototypes.to(device, dtype).requires_grad_())


def bytes_model(op, mode, shape, dtype):
    """Least HBM traffic of the fused algorithm (bytes), the common yardstick of every provider's GB/s."""
    n_crops, b, d, k = SHAPES[shape]
    n, es, it, na = n_crops * b, torch.tensor([], dtype=dtype).element_size(), SETTINGS["sinkhorn_iterations"], 2
    scores = (n * d + k * d) * es + n * k * 4  # read E and P, write S (fp32)
    sinkhorn_passes = it * na * b * k * 4  # one read of the assigned crops' scores per iteration
    loss = 2 * n * k * 4  # read S, write dL/dS
    backward = 2 * n * k * 4 + 2 * k * d * es + 2 * n * d * es  # dS read by 2 matmuls, P read, dP written, E/dE
    return {
        ("head", "forward"): scores + sinkhorn_passes + loss,
        ("head", "full"): scores + sinkhorn_passes + loss + backward,
        ("scores", "forward"): scores,
        ("sinkhorn", "forward"): (it + 1) * b * k * 4 + b * k * 4,  # + the codes pass; codes written in fp32
        ("loss", "full"): loss,
    }[(op, mode)]


# ----------------------------------------------------------------------------------------------- setups
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


def setup(op, mode, provider, shape, dtype, device):
    """A no-argument callable running one benchmark, and the tensors whose .grad it fills (reset between calls).

    The callable returns what it computed (loss, softmax statistics or codes), so that providers can be compared.
    """
    n_crops, b, d, k = SHAPES[shape]
    embeddings, prototypes = make_inputs(shape, dtype, device)
    kw = dict(n_crops=n_crops, **SETTINGS)
    maybe_compile = torch.compile if provider == "compile" else (lambda f: f)
    if op == "head":
        if provider == "triton":
            def loss_fn(e, p):
                return kernels.swav_loss(e, p, backend="triton", **kw)
        else:
            loss_fn = maybe_compile(lambda e, p: swav_loss_reference(e, p, **kw))
        if mode == "forward":
            return (lambda: loss_fn(embeddings, prototypes)), []
        return (lambda: _backward(loss_fn(embeddings, prototypes))), [embeddings, prototypes]
    if op == "scores":
        if provider == "triton":
            head = kernels.swav_head
            cfg = head.head_config(n_crops * b, k, d, b, dtype, dtype)["scores"]
            import triton

            n, nkb = n_crops * b, triton.cdiv(k, cfg["BLOCK_K"])
            out = torch.empty(n, k, device=device)
            part = torch.empty(n, nkb, device=device)
            best = torch.empty(2, n, nkb, device=device)
            rinv = torch.empty(n, device=device)
            e, p = embeddings.detach(), prototypes.detach()

            def run():
                head._swav_scores_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), nkb)](
                    out, out.stride(0), part, best, rinv, e, e.stride(0), e.stride(1), p, p.stride(0), p.stride(1),
                    n, k, d, nkb, 1.0 / SETTINGS["temperature"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                    BLOCK_D=cfg["BLOCK_D"], DOT=cfg["DOT"], num_warps=cfg["num_warps"])
                return torch.logsumexp(part, dim=1)
            return run, []
        fn = maybe_compile(reference_scores)
        e, p = embeddings.detach(), prototypes.detach()
        return (lambda: fn(e, p, SETTINGS["temperature"])), []
    if op == "sinkhorn":
        with torch.no_grad():
            crop_scores = reference_scores(embeddings, prototypes, SETTINGS["temperature"])[0][:b].contiguous()
        eps, its = SETTINGS["epsilon"], SETTINGS["sinkhorn_iterations"]
        if provider == "triton":
            return (lambda: kernels.sinkhorn(crop_scores, epsilon=eps, iterations=its, backend="triton")), []
        fn = maybe_compile(lambda s: sinkhorn_reference(s, epsilon=eps, iterations=its, group=None))
        return (lambda: fn(crop_scores)), []
    if op == "loss":
        with torch.no_grad():
            scores = reference_scores(embeddings, prototypes, SETTINGS["temperature"])[0]
        if provider == "triton":
            import triton

            head = kernels.swav_head
            na, n = len(SETTINGS["crops_for_assign"]), n_crops * b
            slots = [SETTINGS["crops_for_assign"].index(c) if c in SETTINGS["crops_for_assign"] else -1
                     for c in range(n_crops)]
            table = torch.tensor([a * b for a in SETTINGS["crops_for_assign"]] + slots, dtype=torch.int32,
                                 device=device)
            lse = torch.logsumexp(scores / SETTINGS["temperature"], dim=1)
            log_u, rpart, sk = head.sinkhorn_potentials(scores, table[:na], b, epsilon=SETTINGS["epsilon"],
                                                        iterations=SETTINGS["sinkhorn_iterations"], group=None)
            lc = head.head_config(n, k, d, b, dtype, dtype)["loss"]
            grid = (triton.cdiv(b, lc["BLOCK_B"]), triton.cdiv(k, lc["BLOCK_K"]))
            grad = torch.empty_like(scores)
            part = torch.empty(grid[0] * grid[1], device=device)

            def run():  # reads scores, writes dL/dS to a separate buffer so that every call sees the same input
                head._swav_loss_kernel[grid](
                    grad, part, scores, scores.stride(0), lse, log_u, rpart, table, b, k, sk["nkb"], n_crops, na,
                    1.0 / SETTINGS["epsilon"], 1.0 / SETTINGS["temperature"], 1.0 / (b * (n_crops - 1) * na),
                    BLOCK_B=lc["BLOCK_B"], BLOCK_K=lc["BLOCK_K"], MERGE=sk["MERGE"], WRITE_GRAD=True,
                    num_warps=lc["num_warps"])
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


def measured_copy_bandwidth(device):
    """Device-to-device copy of 1 GiB: bytes read + written per second (the practical HBM ceiling)."""
    import triton.testing

    src = torch.empty(2**28, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    return 2 * src.numel() * 4 / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------- checks
def gpu_check(shape, dtype, device):
    """Triton vs reference on this GPU: relative loss difference and largest gradient differences."""
    out = {}
    for backend in ("triton", "torch"):
        e, p = make_inputs(shape, dtype, device, seed=1)
        n_crops = SHAPES[shape][0]
        loss = kernels.swav_loss(e, p, n_crops=n_crops, backend=backend, **SETTINGS)
        loss.backward()
        out[backend] = (loss.detach().double(), e.grad.double(), p.grad.double())
    t, r = out["triton"], out["torch"]
    return dict(loss_triton=t[0].item(), loss_reference=r[0].item(),
                loss_rel_diff=((t[0] - r[0]).abs() / r[0].abs()).item(),
                grad_embeddings_max_abs_diff=(t[1] - r[1]).abs().max().item(),
                grad_embeddings_max_abs=r[1].abs().max().item(),
                grad_prototypes_max_abs_diff=(t[2] - r[2]).abs().max().item(),
                grad_prototypes_max_abs=r[2].abs().max().item(),
                finite=bool(torch.isfinite(t[1]).all() and torch.isfinite(t[2]).all()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="default: all on GPU, seer on CPU")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--benchmarks", nargs="+", default=[f"{o}/{m}" for o, m in BENCHMARKS],
                        choices=[f"{o}/{m}" for o, m in BENCHMARKS])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 gives stable CPU numbers)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "swav_head.json",
                        help="JSON file records are appended to (default: benchmarks/results/swav_head.json under "
                             "the current directory)")


def run(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Check (on CUDA), time and record every benchmark × provider × shape × dtype; progress on stderr, a JSON line
    on stdout. `argv`: the arguments after `seer bench kernels`, stored with each record as its command."""
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    providers = list(args.providers)
    if not on_gpu:
        torch.set_num_threads(args.threads)
        print("NO GPU: GPU numbers cannot be measured on this machine. The Triton kernels would only run in "
              "Triton's CPU interpreter, which is no benchmark; measuring the reference eager vs torch.compile on "
              "CPU instead, and labelling every record as CPU.", file=sys.stderr, flush=True)
        providers = [p for p in providers if p != "triton"]
    shapes = args.shapes or (list(SHAPES) if on_gpu else ["seer"])
    env = environment(device)
    peak_spec = next((v for key, v in HBM_PEAK.items() if key in env["device"]), None) if on_gpu else None
    copy_bw = measured_copy_bandwidth(device) if on_gpu else None
    if on_gpu:
        env.update(hbm_peak_spec_gbps=peak_spec and peak_spec / 1e9, copy_measured_gbps=round(copy_bw / 1e9, 1))
    command = "seer bench kernels " + shlex.join(argv)

    records = []
    for shape in shapes:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            check = gpu_check(shape, dtype, device) if on_gpu else None
            if check:
                print(f"check {shape} {dname}: {check}", file=sys.stderr, flush=True)
            for name in args.benchmarks:
                op, mode = name.split("/")
                nbytes = bytes_model(op, mode, shape, dtype)
                for provider in providers:
                    torch._dynamo.reset()
                    try:
                        fn, grads = setup(op, mode, provider, shape, dtype, device)
                        p20, p50, p80 = (time_gpu if on_gpu else time_cpu)(fn, grads)
                        mem = peak_memory_mb(fn, grads, device)
                        error = None
                    except torch.cuda.OutOfMemoryError as exc:  # record and go on with the sweep
                        p20 = p50 = p80 = mem = None
                        error = f"OOM: {exc}"[:300]
                    gbps = nbytes / (p50 * 1e-3) / 1e9 if p50 else None
                    rec = dict(benchmark="swav_head", op=op, mode=mode, provider=provider, shape=shape,
                               dims=dict(zip(("n_crops", "samples_per_crop", "D", "K"), SHAPES[shape])),
                               settings=SETTINGS, dtype=dname, ms_p20=p20, ms_p50=p50, ms_p80=p80,
                               bytes_model=nbytes, gbps_effective=gbps and round(gbps, 1),
                               pct_hbm_peak_spec=round(100 * gbps * 1e9 / peak_spec, 1) if gbps and peak_spec else None,
                               pct_copy_measured=round(100 * gbps * 1e9 / copy_bw, 1) if gbps and copy_bw else None,
                               peak_memory_mb=mem, check=check, error=error, command=command, **env)
                    records.append(rec)
                    append_records(args.out, [rec])  # record by record: a timeout keeps what ran
                    label = "GPU" if on_gpu else "CPU"
                    ms = f"{p50:9.3f} ms" if p50 else "   failed"
                    extra = f"  {rec['pct_hbm_peak_spec']}% of HBM peak" if rec["pct_hbm_peak_spec"] else ""
                    print(f"[{label}] {shape:5} {dname} {name:16} {provider:7} {ms}  "
                          f"{rec['gbps_effective'] or 0:8.1f} GB/s eff.{extra}", file=sys.stderr, flush=True)
    print(json.dumps({"out": str(args.out), "records": len(records)}))
    return records


def main(argv: list[str] | None = None) -> None:
    script_main("benchmarks.swav_head", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()

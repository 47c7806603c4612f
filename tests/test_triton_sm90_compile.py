"""Every Triton kernel of `kernels` compiles for Hopper (sm_90, the H100/H200 target) without a GPU, as it would run.

The interpreter runs kernels as numpy code, so it cannot see register or shared-memory blow-ups, unsupported ops,
layouts the GPU compiler rejects, or whether a matmul reaches the tensor cores. This test runs the launchers
themselves (forward and backward of swav_loss, sinkhorn) on meta tensors at the benchmark shapes, for every input
type, catches each kernel launch instead of running it, binds its arguments with Triton's own JIT binder (the
specialization a launch on a GPU gets: integers and pointers divisible by 16 marked so, unit strides constant,
the launch's constexprs and num_warps), and compiles each distinct variant for sm_90 in a subprocess without
TRITON_INTERPRET. Per variant it records "inputs" (embeddings × prototypes: "fp32", "bf16", "bf16xfp32"), "dot"
(the matmul input type: ieee, tf32, bf16), "matmul" (the kernel has a tl.dot), "wgmma" (wgmma.mma_async
instructions in its PTX), registers, "local_bytes" (spills), shared memory and the Triton version.

Run directly to write the record as JSON: `python tests/test_triton_sm90_compile.py OUT.json` (committed:
benchmarks/results/sm90_compile.json with the project's Triton, sm90_compile_triton36.json with the GPU image's).
The binder is Triton's internal API (triton.runtime.jit.create_function_from_signature, JITFunction._pack_args),
the same in Triton 3.6 and 3.8.
"""

import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: kernels and benchmarks from this checkout
from benchmarks.swav_head import SHAPES  # noqa: E402  (n_crops, samples per crop, D, K): the benchmark's shapes

RESULTS = ROOT / "benchmarks" / "results"
QUEUE_LENGTH = 256  # rows per assigned crop, for the launches with a queue
INPUTS = {  # label: (embeddings dtype, prototypes dtype, TF32 allowed)
    "fp32": ("float32", "float32", False),
    "fp32+tf32": ("float32", "float32", True),
    "bf16": ("bfloat16", "bfloat16", False),
    "bf16xfp32": ("bfloat16", "float32", False),
}
SCENARIOS = ("train", "no-grad", "queue", "group", "frozen")
H100_SHARED_BYTES = 227 * 1024  # most dynamic shared memory one block may use on sm_90


@contextlib.contextmanager
def caught_launches(modules):
    """Replace the launch of every `_*_kernel` in `modules` by a record (fn, args, kwargs) appended to the list
    yielded; nothing runs."""
    import triton

    launches, kernels = [], []
    for module in modules:
        for name in dir(module):
            fn = getattr(module, name)
            if name.endswith("_kernel") and isinstance(fn, triton.runtime.jit.KernelInterface):  # compiled or interpreted
                kernels.append(fn)
    for fn in kernels:
        fn.run = lambda *args, fn=fn, grid, warmup, **kwargs: launches.append((fn, args, kwargs))
    try:
        yield launches
    finally:
        for fn in kernels:
            del fn.run


class _NoCommunication:
    """Stand-in for torch.distributed inside the launchers: the group launches run, the all-reduces do nothing."""

    ReduceOp = type("ReduceOp", (), {"MAX": "max", "SUM": "sum"})

    @staticmethod
    def all_reduce(tensor, op=None, group=None):
        return None


def launches_of(shape, inputs, scenario, iterations=3):
    """Every kernel launch of one swav_loss call (forward and, when training, backward) on meta tensors."""
    import torch

    head = importlib.import_module("kernels.swav_head")
    sk = importlib.import_module("kernels.sinkhorn")
    n_crops, b, d, k = SHAPES[shape]
    e_dtype, p_dtype, tf32 = INPUTS[inputs]
    meta = dict(device="meta")
    embeddings = torch.empty(n_crops * b, d, dtype=getattr(torch, e_dtype), **meta)
    prototypes = torch.empty(k, d, dtype=getattr(torch, p_dtype), **meta)
    queue = torch.empty(2, QUEUE_LENGTH, d, dtype=torch.float32, **meta) if scenario == "queue" else None
    train = scenario != "no-grad"
    matmul = torch.backends.cuda.matmul
    before, matmul.fp32_precision = matmul.fp32_precision, "tf32" if tf32 else "ieee"
    sk_dist, sk.dist = sk.dist, _NoCommunication
    try:
        with caught_launches((head, sk)) as launches:
            loss, grad, rinv, _ = head.swav_loss_forward(
                embeddings, prototypes, n_crops=n_crops, crops_for_assign=(0, 1), temperature=0.1, epsilon=0.03,
                iterations=iterations, group="group" if scenario == "group" else None, need_grad=train, queue=queue,
                nearest=True)
            if train:  # "frozen": prototypes without gradient, as in SwAV's first iterations
                head.swav_loss_backward(torch.ones((), **meta), grad, embeddings, prototypes, rinv,
                                        head.loss_weight(b, n_crops, 2), True, scenario != "frozen")
            if scenario == "no-grad":  # the public sinkhorn op on this input type's scores
                sk.sinkhorn_forward(torch.empty(b, k, dtype=getattr(torch, e_dtype), **meta), epsilon=0.03,
                                    iterations=iterations, group=None)
    finally:
        matmul.fp32_precision = before
        sk.dist = sk_dist
    return launches


def _resource_usage(cubin: bytes, workdir: Path) -> dict:
    """Registers, stack and local memory (spills) of a cubin, from the cuobjdump that ships with Triton."""
    import triton

    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    line = next(x for x in text.splitlines() if "REG:" in x)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return dict(registers=int(fields["REG"]), stack_bytes=int(fields["STACK"]), local_bytes=int(fields["LOCAL"]))


def compile_all(workdir: Path) -> list[dict]:
    """Compile every distinct launch for sm_90 (must run without TRITON_INTERPRET): one record per variant."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    variants = {}  # compile key -> record
    for shape in SHAPES:
        for inputs in INPUTS:
            for scenario in SCENARIOS:
                for fn, args, kwargs in launches_of(shape, inputs, scenario):
                    bound, specialization, options = create_function_from_signature(fn.signature, fn.params,
                                                                                    backend)(*args, **kwargs)
                    key = (fn.__name__, str(specialization), str(options), inputs.split("+")[0])
                    if key not in variants:
                        variants[key] = dict(kernel=fn.__name__, inputs=inputs.split("+")[0], launch=(fn, kwargs),
                                             bound=(bound, specialization, options), shapes=[], scenarios=[])
                    record = variants[key]
                    record["shapes"] += [shape] if shape not in record["shapes"] else []
                    record["scenarios"] += [scenario] if scenario not in record["scenarios"] else []
    records = []
    for record in variants.values():
        fn, kwargs = record.pop("launch")
        bound, specialization, options = record.pop("bound")
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        start = time.perf_counter()
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        seconds = time.perf_counter() - start
        ptx = kernel.asm["ptx"]
        names = [p.name for p in fn.params]
        constants = {names[path[0]]: value for path, value in constexprs.items()}
        records.append(dict(
            **record, dot=constants.get("DOT"), matmul="tt.dot" in kernel.asm["ttir"],
            wgmma=sum("wgmma.mma_async" in line for line in ptx.splitlines()),
            mma_sync=sum("mma.sync" in line for line in ptx.splitlines()),
            num_warps=options.num_warps, num_stages=options.num_stages, shared_bytes=kernel.metadata.shared,
            **_resource_usage(kernel.asm["cubin"], workdir), compile_seconds=round(seconds, 2),
            constexprs={k: v for k, v in constants.items() if k.isupper()},
            constant_args=sorted(k for k in constants if not k.isupper()),
            divisible_by_16=sorted(names[path[0]] for path, value in attrs.items() if "tt.divisibility" in str(value)),
            triton=triton.__version__))
    return records


def write_record(out: Path) -> None:
    import tempfile

    import numpy
    import torch
    import triton

    from engine.provenance import checkout_git, git_commit

    with tempfile.TemporaryDirectory() as tmp:
        variants = compile_all(Path(tmp))
    status = checkout_git("status", "--porcelain", "kernels")
    record = dict(command="python " + " ".join(Path(a).as_posix() for a in sys.argv), commit=git_commit(),
                  kernels_uncommitted_changes=None if status is None else bool(status),
                  target="cuda sm_90 (GPUTarget('cuda', 90, 32)), compiled without a GPU",
                  triton=triton.__version__, torch=torch.__version__, numpy=numpy.__version__,
                  python=platform.python_version(), shapes=SHAPES, variants=variants)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")


def check(variants):
    """The record's guarantees: no spills, registers and shared memory within sm_90's limits, and every matmul on
    the tensor cores (wgmma) except exact fp32, which by definition runs on FMA units."""
    for r in variants:
        where = f"{r['kernel']} {r['inputs']} dot={r['dot']} {r['shapes']}"
        assert r["local_bytes"] == 0, f"register spills: {where}: {r['local_bytes']} local bytes"
        assert r["registers"] <= 255 and r["shared_bytes"] <= H100_SHARED_BYTES, f"{where}: {r}"
        if r["matmul"] and r["dot"] != "ieee":
            assert r["wgmma"] > 0, f"no wgmma: {where}"
    bf16_matmuls = [r for r in variants if r["matmul"] and r["inputs"] in ("bf16", "bf16xfp32")]
    assert {r["inputs"] for r in bf16_matmuls} == {"bf16", "bf16xfp32"}, "no bf16 matmul variant compiled"


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "sm90_compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(record, record_property):
    sk = importlib.import_module("kernels.sinkhorn")
    head = importlib.import_module("kernels.swav_head")
    expected = {name for module in (sk, head) for name in dir(module)
                if name.startswith("_") and name.endswith("_kernel")}
    variants = record["variants"]
    assert {r["kernel"] for r in variants} == expected
    print(f"\nsm_90 (triton {record['triton']}): per variant registers / spills / shared memory / wgmma")
    for r in variants:
        print(f"  {r['kernel']:<32} {r['inputs']:<9} {r['dot'] or '-':<5} warps {r['num_warps']}  regs "
              f"{r['registers']:>3}  local {r['local_bytes']:>4} B  shared {r['shared_bytes']:>6} B  wgmma "
              f"{r['wgmma']:>3}  ({r['compile_seconds']:.1f} s) {','.join(r['shapes'])}")
    record_property("sm90_compile", [{k: r[k] for k in ("kernel", "inputs", "dot", "registers", "local_bytes",
                                                           "shared_bytes", "wgmma")} for r in variants])
    check(variants)
    # The runtime's specialization reached the compiler: the score matrix's row stride (K) is divisible by 16.
    scores = [r for r in variants if r["kernel"] == "_swav_scores_kernel"]
    assert all("stride_sn" in r["divisible_by_16"] and "stride_ed" in r["constant_args"] for r in scores), scores


@pytest.mark.parametrize("name", ["sm90_compile.json", "sm90_compile_triton36.json"])
def test_committed_records_hold_and_are_current(record, name):
    """The committed records (this Triton, and the GPU image's 3.6) keep the guarantees and cover today's kernels."""
    committed = json.loads((RESULTS / name).read_text())
    assert committed["command"].startswith("python tests/test_triton_sm90_compile.py benchmarks/results/" + name)
    check(committed["variants"])

    def variant_keys(variants):
        return {(r["kernel"], r["inputs"], r["dot"], json.dumps(r["constexprs"], sort_keys=True), r["num_warps"])
                for r in variants}

    assert variant_keys(committed["variants"]) == variant_keys(record["variants"]), (
        f"benchmarks/results/{name} is stale: rerun its command")


if __name__ == "__main__":
    write_record(Path(sys.argv[1]))

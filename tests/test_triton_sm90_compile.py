"""Every Triton kernel of `kernels` compiles for Hopper (sm_90, the H100/H200 target) without a GPU.

The interpreter runs kernels as numpy code, so it cannot see register or shared-memory blow-ups, unsupported ops
or layouts the GPU compiler rejects. This test runs `triton.compile` on each kernel, with the block sizes the
launchers choose at SEER's per-GPU shape and at a large batch, in a subprocess without TRITON_INTERPRET (set by
conftest for this process), and records registers, spills and shared memory per kernel variant.

Run directly to write the records as JSON: `python tests/test_triton_sm90_compile.py OUT.json`.
"""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (rows N, prototypes K, dim D, crops)
    "seer": (96, 16000, 256, 6),  # 2×16 + 4×16 embeddings per GPU
    "large": (4096, 16000, 256, 8),  # 2 + 6 crops (SwAV's RN50 recipe) × 512 samples
}
H100_SHARED_BYTES = 227 * 1024  # most dynamic shared memory one block may use on sm_90
FLOAT_ARGS = {"inv_eps", "inv_temp", "weight"}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _signature(fn, pointer_dtypes, constexprs):
    """Triton signature of `fn`: pointers *fp32 unless named, i32 integers, fp32 floats, given constexprs."""
    declared = {p.name for p in fn.params if p.is_constexpr}
    sig = {}
    for name in fn.arg_names:
        if name in declared or name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_dtypes.get(name, "*fp32")
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = declared - set(constexprs)
    assert not missing, f"{fn.__name__}: no value for constexprs {missing}"
    return sig


def _variants():
    """(label, jit function, pointer dtypes, constexprs incl. unit strides, num_warps) for every launch kind."""
    sk = importlib.import_module("kernels.sinkhorn")
    head = importlib.import_module("kernels.swav_head")
    out = []
    for shape, (n, k, d, crops) in SHAPES.items():
        b = n // crops
        c = sk.sinkhorn_config(b, k)
        blocks = dict(BLOCK_B=c["BLOCK_B"], BLOCK_K=c["BLOCK_K"], MERGE=c["MERGE"])
        for mode, flags in {"iteration": (False, True, True), "first": (True, True, True),
                            "group-col": (False, True, False), "group-row": (False, False, True)}.items():
            const = dict(zip(("FIRST", "COL_STEP", "ROW_STEP"), flags), stride_xk=1, stride_ek=1, **blocks)
            out.append((f"sinkhorn_pass[{mode}] {shape}", sk._sinkhorn_pass_kernel, {"row0_ptr": "*i32"}, const,
                        c["num_warps"]))
        out.append((f"sinkhorn_pass[iteration, bf16 scores] {shape}", sk._sinkhorn_pass_kernel,
                    {"row0_ptr": "*i32", "x_ptr": "*bf16"},
                    dict(FIRST=False, COL_STEP=True, ROW_STEP=True, stride_xk=1, stride_ek=1, **blocks),
                    c["num_warps"]))
        out.append((f"sinkhorn_codes[bf16 scores] {shape}", sk._sinkhorn_codes_kernel, {"x_ptr": "*bf16"},
                    dict(stride_xk=1, **blocks), c["num_warps"]))

        for label, e_t, p_t, precision, row_stats in (
                ("fp32", "fp32", "fp32", "ieee", True), ("fp32 tf32", "fp32", "fp32", "tf32", True),
                ("bf16", "bf16", "bf16", "ieee", True), ("bf16×fp32", "bf16", "fp32", "ieee", True),
                ("queue fp32", "fp32", "fp32", "ieee", False), ("queue bf16", "bf16", "bf16", "ieee", False)):
            sc = head.head_config(n, k, d, b, TORCH_DTYPES[e_t], TORCH_DTYPES[p_t])["scores"]
            out.append((f"swav_scores[{label}] {shape}", head._swav_scores_kernel,
                        {"e_ptr": f"*{e_t}", "p_ptr": f"*{p_t}"},
                        dict(stride_ed=1, BLOCK_N=sc["BLOCK_N"], BLOCK_K=sc["BLOCK_K"], BLOCK_D=sc["BLOCK_D"],
                             UPCAST=sc["UPCAST"], DOT_PRECISION=precision, ROW_STATS=row_stats), sc["num_warps"]))
        cfg = head.head_config(n, k, d, b, torch.float32, torch.float32)
        lc = cfg["loss"]
        for grad in (True, False):
            out.append((f"swav_loss[{'grad' if grad else 'no grad'}] {shape}", head._swav_loss_kernel,
                        {"table_ptr": "*i32"},
                        dict(BLOCK_B=lc["BLOCK_B"], BLOCK_K=lc["BLOCK_K"], MERGE=c["MERGE"], WRITE_GRAD=grad),
                        lc["num_warps"]))
        nc = cfg["norm"]
        for e_t in ("fp32", "bf16"):
            out.append((f"l2norm_backward[{e_t}] {shape}", head._l2norm_backward_kernel,
                        {"de_ptr": f"*{e_t}", "e_ptr": f"*{e_t}"},
                        dict(stride_ed=1, BLOCK_N=nc["BLOCK_N"], BLOCK_D=nc["BLOCK_D"], WRITE_DE=True, WRITE_ZG=True),
                        nc["num_warps"]))
    return out


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
    """Compile every variant for sm_90 (must run without TRITON_INTERPRET) and return one record per variant."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    sys.path.insert(0, str(ROOT))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    records = []
    for label, fn, pointers, const, warps in _variants():
        src = ASTSource(fn, _signature(fn, pointers, const), const)
        start = time.perf_counter()
        kernel = triton.compile(src, target=target, options=dict(num_warps=warps))
        seconds = time.perf_counter() - start
        records.append(dict(kernel=fn.__name__, variant=label, num_warps=warps, shared_bytes=kernel.metadata.shared,
                            compile_seconds=round(seconds, 2), ptx_lines=kernel.asm["ptx"].count("\n"),
                            **_resource_usage(kernel.asm["cubin"], workdir),
                            constexprs={k: v for k, v in const.items()}, triton=triton.__version__))
    return records


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "sm90_compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(records, record_property):
    sk = importlib.import_module("kernels.sinkhorn")
    head = importlib.import_module("kernels.swav_head")
    expected = {name for module in (sk, head) for name in dir(module)
                if name.startswith("_") and name.endswith("_kernel")}
    assert {r["kernel"] for r in records} == expected
    print(f"\nsm_90 (triton {records[0]['triton']}): registers / spills (local bytes) / shared memory per variant")
    for r in records:
        print(f"  {r['variant']:<45} warps {r['num_warps']}  regs {r['registers']:>3}  local {r['local_bytes']:>4} B"
              f"  shared {r['shared_bytes']:>6} B  ({r['compile_seconds']:.1f} s)")
    record_property("sm90_compile", [{k: r[k] for k in ("variant", "num_warps", "registers", "local_bytes",
                                                           "shared_bytes")} for r in records])
    for r in records:
        assert r["registers"] <= 255 and r["shared_bytes"] <= H100_SHARED_BYTES, r
        assert r["local_bytes"] == 0, f"register spills: {r}"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = compile_all(Path(tmp))
    Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
    Path(sys.argv[1]).write_text(json.dumps(result, indent=1) + "\n")

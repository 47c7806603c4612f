"""What the Triton ops of `kernels` share: the interpreter flag, one block-size helper, the matmul input types.

Block sizes are powers of two chosen by arithmetic for an H100/H200-class GPU (132 SMs, 228 KB shared memory
per SM), not by a sweep on a GPU; benchmarks/swav_head.py times the kernels with them, and the sm_90 compile test
records the registers, shared memory and tensor-core instructions each kernel gets.
"""

import torch
import triton
import triton.language as tl

from ._backend import interpreting

# Decided once, like triton.jit's own choice between compiling and interpreting.
INTERPRET = interpreting()
_INTERPRET = tl.constexpr(INTERPRET)  # the same, readable inside kernels

# Masked lanes and the initial running maximum of online log-sum-exps. Finite, so that max(NEG, NEG) - NEG
# is 0 rather than nan; every real value (scores / epsilon, plus potentials) is many orders above it.
NEG = tl.constexpr(-1.0e30)

# Most tile elements (rows × columns) one program keeps per live fp32 tile in the vector kernels (4096 elements
# over 8 warps = 16 registers per thread per tile).
MAX_TILE = 4096

# Streaming multiprocessors of an H100/H200: the launchers size split reductions to fill about one wave of them.
SM_COUNT = 132

# L2 cache of an H100/H200 (GH100 as enabled, datasheet): what Sinkhorn's column blocks are sized to stay in.
L2_BYTES = 50 * 10**6


def pow2(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n, clamped to [lo, hi] (lo and hi powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def num_warps(tile_elems: int) -> int:
    """Warps for a program whose widest live tile has `tile_elems` fp32 elements: 16 per thread up to 4 warps.

    The sm_90 compile test shows the effect: SwAV's loss kernel (~6 live tiles) needs ~220 registers per thread
    with 16 elements per thread per tile, ~250 with 32.
    """
    return 4 if tile_elems <= 2048 else 8


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (SM_COUNT where there is no CUDA device: the interpreter, meta)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT


def tf32_allowed() -> bool:
    """Whether the caller lets fp32 matmuls use TF32 tensor cores, read as cuBLAS reads it.

    torch >= 2.9 has a per-backend setting (torch.backends.cuda.matmul.fp32_precision, "none" until set) beside the
    legacy one (allow_tf32, which torch.set_float32_matmul_precision("high") turns on); reading the legacy one after
    the new one was set raises, so the new one is read first.
    """
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_inputs(*dtypes: torch.dtype) -> str:
    """What a kernel's tl.dot multiplies for operands stored in `dtypes`: "bf16", "fp16", "tf32" or "ieee".

    A 16-bit operand takes the other to its type (bf16 embeddings × fp32 prototypes, the training path under
    autocast, run as bf16 × bf16 with fp32 accumulation on tensor cores: what autocast does to the reference's
    matmul too); fp32 × fp32 runs on TF32 tensor cores when torch allows TF32 matmuls (tf32_allowed), as exact
    fp32 ("ieee") otherwise, and so does the odd bf16 × fp16 pair.
    """
    half = {d for d in dtypes if d in (torch.bfloat16, torch.float16)}
    if len(half) == 1:
        return "bf16" if half == {torch.bfloat16} else "fp16"
    return "tf32" if tf32_allowed() else "ieee"


@triton.jit
def dot_operand(x, DOT: tl.constexpr):
    """x as tl.dot's operand for the input type DOT (see dot_inputs): in the 16-bit type, or fp32 for tf32/ieee.

    tf32 operands are rounded to nearest (cvt.rna, as cuBLAS rounds): Triton's own tf32 dot passes fp32 registers
    to the wgmma unrounded (no cvt in its PTX), leaving the hardware to drop the 13 low mantissa bits (a truncation,
    as far as documented; not observed here), whose bias (every product too small, by 2^-11 on average) moved SwAV's
    loss 80x more than rounding in the interpreted tests (benchmarks/README.md). The interpreter computes every dot
    exactly in fp32 and truncates fp32 to bf16, so there the operand is rounded as the GPU rounds it and kept in fp32
    (round to nearest even for bf16, as cvt.rn): interpreted tests see the GPU's operands; only the order of the fp32
    accumulation differs.
    """
    if _INTERPRET:
        y = x.to(tl.float32)
        if DOT == "bf16":
            bits = y.to(tl.int32, bitcast=True)
            y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        elif DOT == "fp16":
            y = y.to(tl.float16).to(tl.float32)
        elif DOT == "tf32":  # half an ulp onto the magnitude, then truncate: ties away from zero, as cvt.rna
            y = ((y.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    elif DOT == "bf16":
        y = x.to(tl.bfloat16)
    elif DOT == "fp16":
        y = x.to(tl.float16)
    elif DOT == "tf32":
        y = tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x.to(tl.float32)], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def dot(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with a and b from dot_operand(.., DOT): fp32 accumulation, TF32 tensor cores for DOT "tf32"."""
    if _INTERPRET or DOT == "ieee":
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == "tf32":
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc

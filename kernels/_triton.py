"""What the Triton ops of `kernels` share: the interpreter flag, one block-size helper, dot precision.

Block sizes are powers of two chosen by arithmetic for an H100/H200-class GPU (132 SMs, 228 KB shared memory
per SM), not by a sweep on a GPU; benchmarks/swav_head.py times the kernels with them, and the sm_90 compile test
records the registers and shared memory each kernel gets.
"""

import torch
import triton
import triton.language as tl

from ._backend import interpreting

# Decided once, like triton.jit's own choice between compiling and interpreting.
INTERPRET = interpreting()

# Masked lanes and the initial running maximum of online log-sum-exps. Finite, so that max(NEG, NEG) - NEG
# is 0 rather than nan; every real value (scores / epsilon, plus potentials) is many orders above it.
NEG = tl.constexpr(-1.0e30)

# Most tile elements (rows × columns) one program keeps per live fp32 tile in the vector kernels (4096 elements
# over 8 warps = 16 registers per thread per tile).
MAX_TILE = 4096


def pow2(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n, clamped to [lo, hi] (lo and hi powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def num_warps(tile_elems: int) -> int:
    """Warps for a program whose widest live tile has `tile_elems` fp32 elements: 16 per thread up to 4 warps.

    The sm_90 compile test shows the effect: SwAV's loss kernel (~6 live tiles) needs ~220 registers per thread
    with 16 elements per thread per tile, ~250 with 32.
    """
    return 4 if tile_elems <= 2048 else 8


def dot_precision() -> str:
    """Precision of fp32 `tl.dot`s: torch's own matmul policy, so the kernels round like the reference does.

    torch's default ("highest") is true fp32 ("ieee"); torch.set_float32_matmul_precision("high") lets both the
    reference matmul and these kernels use TF32 tensor cores. (The interpreter always computes in fp32.)
    """
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


"""Backend selection shared by every public op of `kernels`."""

import os

import torch

BACKENDS = ("auto", "torch", "triton")
# The Triton kernels load these storage dtypes and accumulate in float32. float64 stays on the reference,
# which computes in float64 (gradcheck, debugging); "auto" sends it there, "triton" refuses it.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, read when kernels import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> str:
    """Turn the user's `backend` into the implementation to run: "torch" or "triton".

    "auto" picks "triton" when any input lives on a CUDA device and every input is float16, bfloat16 or float32,
    otherwise "torch" (the reference). "triton" runs the kernels on CUDA tensors, or on CPU tensors inside
    Triton's interpreter (TRITON_INTERPRET=1 before kernels is imported, as the tests do).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    dtypes = [t.dtype for t in tensors if hasattr(t, "dtype")]
    if backend == "auto":
        on_cuda = any(getattr(t, "is_cuda", False) for t in tensors)
        return "triton" if on_cuda and all(d in TRITON_DTYPES for d in dtypes) else "torch"
    if backend == "triton":
        bad = [d for d in dtypes if d not in TRITON_DTYPES]
        if bad:
            raise ValueError(
                f"{op}: backend='triton' takes float16, bfloat16 or float32 inputs, got {bad[0]}; "
                "pass backend='torch' (the reference computes in float64)"
            )
        if not interpreting() and not all(getattr(t, "is_cuda", False) for t in tensors):
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing kernels, "
                "to run the kernels in Triton's CPU interpreter); pass backend='torch' for CPU tensors"
            )
    return backend

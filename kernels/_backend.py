"""Backend selection shared by every public op of `kernels`."""

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> str:
    """Turn the user's `backend` into the implementation to run: "torch" or "triton".

    "auto" is meant to pick "triton" when any input lives on a CUDA device; until the Triton kernels exist
    it picks "torch" everywhere, so that training on a GPU works with the default settings.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "torch"
    if backend == "triton":
        raise NotImplementedError(
            f"{op}: the Triton backend is not implemented yet; pass backend='torch' to use the "
            "PyTorch reference implementation"
        )
    return backend

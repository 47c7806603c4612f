"""SwAV's distributed Sinkhorn-Knopp: turn prototype scores into balanced soft assignments (codes).

The reference runs in the log domain so that exp(scores / epsilon) never has to be formed: plain SwAV
overflows (fp16, small epsilon) or divides 0 by 0 (a sample far below the global maximum).
"""

import torch
import torch.distributed as dist

from ._backend import resolve_backend


def _check_args(scores: torch.Tensor, epsilon: float, iterations: int) -> None:
    """Raise ValueError naming the first bad argument."""
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be 2-D (B × K), got shape {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be an integer >= 1, got {iterations!r}")


def _logsumexp_over_samples(x: torch.Tensor, group) -> torch.Tensor:
    """log Σ_b exp(x[b, k]) over the samples of every rank in `group` (1 × K), stable for any magnitude."""
    shift = x.amax(dim=0, keepdim=True)
    if group is not None:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    total = torch.exp(x - shift).sum(dim=0, keepdim=True)
    if group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return shift + total.log()


@torch.no_grad()
def sinkhorn_reference(scores: torch.Tensor, *, epsilon: float, iterations: int, group) -> torch.Tensor:
    """Plain-PyTorch Sinkhorn-Knopp; see `sinkhorn` for the contract.

    SwAV scales Q = exp(S / eps)ᵀ by a prototype potential u (rows to 1/K) and a sample potential v
    (columns to 1/B_global) in turn. Here log u and log v are kept instead of Q. The targets 1/K and
    1/B_global, and SwAV's first division by the total, are constant factors that the next normalization
    cancels, so they are dropped (B_global is never needed). The last sample step followed by × B_global
    is exactly a softmax over prototypes, which is how the codes come out.
    """
    _check_args(scores, epsilon, iterations)
    x = scores.detach().to(torch.promote_types(scores.dtype, torch.float32)) / epsilon
    log_u = -_logsumexp_over_samples(x, group)  # first prototype step, v = 1
    for _ in range(iterations - 1):
        log_v = -torch.logsumexp(x + log_u, dim=1, keepdim=True)  # sample step: local to each rank
        log_u = -_logsumexp_over_samples(x + log_v, group)  # prototype step: sums over all ranks
    return torch.softmax(x + log_u, dim=1)


def sinkhorn(
    scores: torch.Tensor,
    *,
    epsilon: float = 0.05,
    iterations: int = 3,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Balanced soft assignments of samples to prototypes (SwAV's codes), without gradient.

    scores: B_local × K similarities of this rank's samples to the prototypes, any float dtype.
    Returns B_local × K codes in float32 (float64 if scores are float64); each row sums to 1 and, as
    iterations grow, every prototype receives B_global / K of the total mass.

    epsilon: entropic regularization (smaller = sharper codes). iterations: number of prototype-then-
    sample scaling rounds (SwAV 3, SEER 10).
    group: torch.distributed process group over whose ranks the batch is split; the prototype sums then
    run over the samples of all its ranks (each rank passes its own slice and gets its own codes back).
    None means no communication at all: the local batch is the whole batch, even if a default process
    group exists; pass torch.distributed.group.WORLD to balance over every rank.
    backend: "torch", "triton", or "auto" ("triton" for CUDA tensors, "torch" otherwise).
    """
    resolve_backend(backend, scores, op="sinkhorn")
    return sinkhorn_reference(scores, epsilon=epsilon, iterations=iterations, group=group)

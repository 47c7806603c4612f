"""SwAV's swapped-prediction loss: every crop predicts the Sinkhorn codes of the assigned crops."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._backend import resolve_backend
from .sinkhorn import sinkhorn_reference


def _check_args(embeddings, prototypes, n_crops, crops_for_assign, temperature, epsilon, sinkhorn_iterations):
    """Raise ValueError naming the first bad argument."""
    if embeddings.dim() != 2:
        raise ValueError(f"swav_loss: embeddings must be 2-D (n_crops·B × D), got shape {tuple(embeddings.shape)}")
    if prototypes.dim() != 2:
        raise ValueError(f"swav_loss: prototypes must be 2-D (K × D), got shape {tuple(prototypes.shape)}")
    if not isinstance(n_crops, int) or n_crops < 2:
        raise ValueError(f"swav_loss: n_crops must be an integer >= 2, got {n_crops!r}")
    rows, dim = embeddings.shape
    if rows == 0 or rows % n_crops:
        raise ValueError(
            f"swav_loss: embeddings has {rows} rows (shape {tuple(embeddings.shape)}), "
            f"not a positive multiple of n_crops={n_crops}"
        )
    if prototypes.shape[1] != dim:
        raise ValueError(
            f"swav_loss: prototypes have D={prototypes.shape[1]} (shape {tuple(prototypes.shape)}) but "
            f"embeddings have D={dim} (shape {tuple(embeddings.shape)})"
        )
    if len(crops_for_assign) == 0:
        raise ValueError("swav_loss: crops_for_assign must name at least one crop")
    for a in crops_for_assign:
        if not isinstance(a, int) or not 0 <= a < n_crops:
            raise ValueError(
                f"swav_loss: crops_for_assign {tuple(crops_for_assign)} has {a!r}, outside 0..{n_crops - 1}"
            )
    if len(set(crops_for_assign)) != len(crops_for_assign):
        raise ValueError(f"swav_loss: crops_for_assign {tuple(crops_for_assign)} contains a duplicate")
    if not temperature > 0:
        raise ValueError(f"swav_loss: temperature must be > 0, got {temperature}")
    if not epsilon > 0:
        raise ValueError(f"swav_loss: epsilon must be > 0, got {epsilon}")
    if not isinstance(sinkhorn_iterations, int) or sinkhorn_iterations < 1:
        raise ValueError(f"swav_loss: sinkhorn_iterations must be an integer >= 1, got {sinkhorn_iterations!r}")


def swav_loss_reference(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    n_crops: int,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    group=None,
) -> torch.Tensor:
    """Plain-PyTorch SwAV loss; see `swav_loss` for the contract."""
    _check_args(embeddings, prototypes, n_crops, crops_for_assign, temperature, epsilon, sinkhorn_iterations)
    dtype = torch.promote_types(torch.promote_types(embeddings.dtype, prototypes.dtype), torch.float32)
    z = F.normalize(embeddings.to(dtype), dim=1)
    scores = (z @ prototypes.to(dtype).T).view(n_crops, -1, prototypes.shape[0])  # crop × sample × prototype
    log_p = torch.log_softmax(scores / temperature, dim=2)
    terms = []
    for a in crops_for_assign:
        q = sinkhorn_reference(scores[a], epsilon=epsilon, iterations=sinkhorn_iterations, group=group)
        others = [v for v in range(n_crops) if v != a]
        # Cross-entropy, averaged over the predicting crops and the local samples at once.
        terms.append(-(q * log_p[others]).sum(dim=2).mean())
    return torch.stack(terms).mean()


def swav_loss(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    n_crops: int,
    crops_for_assign: Sequence[int] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """SwAV swapped-prediction loss of a multi-crop batch, as a scalar.

    embeddings: (n_crops·B) × D head outputs in crop-major order (rows c·B .. (c+1)·B - 1 are crop c), not
    yet normalized: the op L2-normalizes each row. prototypes: K × D, used as given (normalize them after
    each optimizer step, as SwAV does). Scores are computed in float32, or float64 if an input is float64;
    the loss has that dtype.

    For each crop a in crops_for_assign, Sinkhorn codes q of crop a's scores (no gradient) are predicted
    by every other crop v through softmax(scores_v / temperature); the loss is the cross-entropy averaged
    over the B local samples, the n_crops - 1 predicting crops and the assigned crops. The gradient flows
    into embeddings (through the normalization) and prototypes, never through the codes. Averaging over
    the local batch means that data-parallel gradient averaging gives the global-batch gradient.

    group: process group over which Sinkhorn balances the codes (see `sinkhorn`; None = no communication).
    backend: "torch", "triton", or "auto" ("triton" for CUDA tensors, "torch" otherwise).
    """
    resolve_backend(backend, embeddings, prototypes, op="swav_loss")
    return swav_loss_reference(
        embeddings,
        prototypes,
        n_crops=n_crops,
        crops_for_assign=crops_for_assign,
        temperature=temperature,
        epsilon=epsilon,
        sinkhorn_iterations=sinkhorn_iterations,
        group=group,
    )

"""SwAV's swapped-prediction loss: every crop predicts the Sinkhorn codes of the assigned crops."""

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import resolve_backend
from ._triton import MAX_TILE, NEG, dot, dot_inputs, dot_operand, num_warps, pow2, sm_count
from .sinkhorn import row_normalizer, sinkhorn_potentials, sinkhorn_reference


def _check_args(embeddings, prototypes, n_crops, crops_for_assign, temperature, epsilon, sinkhorn_iterations, queue):
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
    if queue is not None:
        n_assign = len(crops_for_assign)
        if queue.dim() != 3:
            raise ValueError(f"swav_loss: queue must be 3-D (len(crops_for_assign)={n_assign} × L × D={dim}), "
                             f"got shape {tuple(queue.shape)}")
        if queue.shape[0] != n_assign:
            raise ValueError(f"swav_loss: queue has {queue.shape[0]} slots (shape {tuple(queue.shape)}) but "
                             f"crops_for_assign {tuple(crops_for_assign)} names {n_assign} crops: one slot each")
        if queue.shape[2] != dim:
            raise ValueError(f"swav_loss: queue has D={queue.shape[2]} (shape {tuple(queue.shape)}) but "
                             f"embeddings have D={dim} (shape {tuple(embeddings.shape)})")
        if queue.device != embeddings.device:
            raise ValueError(f"swav_loss: queue is on {queue.device} but embeddings are on {embeddings.device}")
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
    queue: torch.Tensor | None = None,
    return_nearest: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch SwAV loss; see `swav_loss` for the contract."""
    _check_args(embeddings, prototypes, n_crops, crops_for_assign, temperature, epsilon, sinkhorn_iterations, queue)
    dtype = torch.promote_types(torch.promote_types(embeddings.dtype, prototypes.dtype), torch.float32)
    z = F.normalize(embeddings.to(dtype), dim=1)
    scores = (z @ prototypes.to(dtype).T).view(n_crops, -1, prototypes.shape[0])  # crop × sample × prototype
    b = scores.shape[1]
    log_p = torch.log_softmax(scores / temperature, dim=2)
    queue_scores = None
    if queue is not None and queue.shape[1]:
        with torch.no_grad():  # assigned slot × L × K, constants like the codes
            queue_scores = F.normalize(queue.detach().to(dtype), dim=2) @ prototypes.detach().to(dtype).T
    terms = []
    for i, a in enumerate(crops_for_assign):
        crop_scores = scores[a] if queue_scores is None else torch.cat((scores[a].detach(), queue_scores[i]))
        # Codes of the batch rows only; the queue rows count in Sinkhorn's prototype sums.
        q = sinkhorn_reference(crop_scores, epsilon=epsilon, iterations=sinkhorn_iterations, group=group)[:b]
        others = [v for v in range(n_crops) if v != a]
        # Cross-entropy, averaged over the predicting crops and the local samples at once.
        terms.append(-(q * log_p[others]).sum(dim=2).mean())
    loss = torch.stack(terms).mean()
    if return_nearest:
        return loss, scores.detach()[list(crops_for_assign)].argmax(dim=2)
    return loss


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
    queue: torch.Tensor | None = None,
    backend: str = "auto",
    return_nearest: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SwAV swapped-prediction loss of a multi-crop batch, as a scalar.

    embeddings: (n_crops·B) × D head outputs in crop-major order (rows c·B .. (c+1)·B - 1 are crop c), not
    yet normalized: the op L2-normalizes each row. prototypes: K × D, used as given (normalize them after
    each optimizer step, as SwAV does). Scores are float32, or float64 if an input is float64; the loss has that
    dtype. The reference multiplies in that dtype; the Triton kernels' matmuls (forward and backward) accumulate in
    fp32 and multiply bf16 (fp16) operands on tensor cores when either input is bf16 (fp16), the other one, dL/dS
    and the normalized embeddings rounded to it in the kernels (bf16 embeddings × fp32 prototypes: autocast's
    training path, rounded as autocast rounds the reference's matmul and its backward); fp32 inputs multiply as TF32
    on tensor cores when torch allows TF32 matmuls (torch.backends.cuda.matmul), as exact fp32 otherwise
    (benchmarks/README.md states what each costs in accuracy).

    For each crop a in crops_for_assign, Sinkhorn codes q of crop a's scores (no gradient) are predicted
    by every other crop v through softmax(scores_v / temperature); the loss is the cross-entropy averaged
    over the B local samples, the n_crops - 1 predicting crops and the assigned crops. The gradient flows
    into embeddings (through the normalization) and prototypes, never through the codes. Averaging over
    the local batch means that data-parallel gradient averaging gives the global-batch gradient.

    group: process group over which Sinkhorn balances the codes (see `sinkhorn`; None = no communication).
    queue: None, or len(crops_for_assign) × L × D past embeddings of this rank (SwAV's queue; slot i belongs to
    crops_for_assign[i]), L2-normalized here like embeddings and never given a gradient. Their scores against the
    current prototypes join assigned crop i's batch rows in Sinkhorn (the prototype sums then run over batch and
    queue rows of every rank in `group`); only the batch rows' codes enter the loss, so the loss, its gradient and
    the averaging are those of the batch alone. L = 0 is the same as no queue.
    backend: "torch" (the reference), "triton" (fused kernels: float16/bfloat16/float32 inputs, fp32 accumulation and
    softmax/Sinkhorn arithmetic, matmul inputs as above; CUDA tensors, or CPU tensors in Triton's interpreter), or
    "auto" ("triton" for CUDA tensors unless an input is float64, "torch" otherwise).
    return_nearest: also return, as int64 len(crops_for_assign) × B, the prototype each assigned crop's sample
    scores highest against (argmax_k of its score row; row i belongs to crops_for_assign[i]), for prototype-usage
    monitors: (loss, nearest). Triton takes it from the scoring pass (no second score matrix); between prototypes
    whose scores tie to within the matmul's rounding the two backends may pick differently.
    """
    inputs = (embeddings, prototypes) if queue is None else (embeddings, prototypes, queue)
    if resolve_backend(backend, *inputs, op="swav_loss") == "triton":
        _check_args(embeddings, prototypes, n_crops, crops_for_assign, temperature, epsilon, sinkhorn_iterations,
                    queue)
        queue = queue.detach() if queue is not None and queue.shape[1] else None
        return _swav_loss_triton(embeddings, prototypes, queue, n_crops, tuple(crops_for_assign), temperature,
                                 epsilon, sinkhorn_iterations, group, return_nearest)
    return swav_loss_reference(
        embeddings,
        prototypes,
        n_crops=n_crops,
        crops_for_assign=crops_for_assign,
        temperature=temperature,
        epsilon=epsilon,
        sinkhorn_iterations=sinkhorn_iterations,
        group=group,
        queue=queue,
        return_nearest=return_nearest,
    )


# ---------------------------------------------------------------------------------------------------------------
# Triton: forward = scoring kernel, one Sinkhorn kernel per iteration (two with a process group), loss kernel, and
# two small torch reductions (N × K/128 softmax partials, per-program loss partials); backward = three kernels whose
# matmuls read tiles of dL/dS (tl.dot, no torch.mm). The N × K buffers: S (fp32, the forward's), and dL/dS, which
# overwrites S in place for fp32 matmuls and is a separate 16-bit buffer for bf16/fp16 ones (S then freed after the
# forward).
#
# forward
#   _swav_scores_kernel   S = normalize(E) @ Pᵀ (N × K fp32, tl.dot with fp32 accumulation, tensor cores unless the
#                         matmul is exact fp32; ‖e‖ accumulated in the same D loop) plus, per row and block of K
#                         columns, the partial log-sum-exp of S/T and the partial maximum of S and its column: the
#                         temperature-softmax statistics and the nearest prototypes come out of the scoring pass
#                         (torch.logsumexp / argmax over the N × K/128 partials merge them).
#   with a queue          _swav_scores_kernel again, without the row statistics: S_queue = normalize(queue) @ Pᵀ
#                         ((n_assign·L) × K fp32, freed after the forward); slot i's L rows join assigned crop i's
#                         Sinkhorn problem as extra rows (no N × K concatenation).
#   sinkhorn_potentials   Sinkhorn of every assigned crop's rows of S (and of S_queue) at once (kernels/sinkhorn.py):
#                         one or two sweeps over the scores per iteration, codes never materialized.
#   _swav_loss_kernel     per tile of B samples × K columns: codes q_a of the assigned crops from S, log u and
#                         the rows' normalizers (kernels/sinkhorn.py); then for every crop v the cross-entropy
#                         against Σ_{a≠v} q_a and its gradient
#                         dL/dS_v = w·G_v,  G_v = (n_v·softmax(S_v/T) − Σ_{a≠v} q_a)/T,
#                         n_v = number of assigned crops other than v (each q_a row sums to 1),
#                         w = 1/(B·(n_crops−1)·n_assign). G is stored (rounded to the matmul's input type), w
#                         applied in the backward's epilogues: |G| ≤ n_assign/T keeps 16-bit storage in range where
#                         w·G (~1e-7 at SwAV's shapes) would underflow fp16.
# backward (g = grad_output, a device scalar: no host sync)
#   _grad_embeddings_kernel  dZ partials: G @ P over one of SPLIT slices of the prototypes per program (SPLIT
#                            fills the GPU when N is small), fp32 N × D per slice.
#   _l2norm_backward_kernel  dZ = w·g·Σ partials; dE = (dZ − Z (Z · dZ)) / ‖E‖ (F.normalize's backward); and Z
#                            in the matmul's input type for the next kernel.
#   _grad_prototypes_kernel  dP = w·g·Gᵀ @ Z, BLOCK_K prototypes per program.
# HBM passes over N × K per training step (bytes per element): forward S written (4), Sinkhorn reads the assigned
# rows once per iteration (twice where its column strips cannot stay in L2: kernels/sinkhorn.py), the loss reads
# S (4) and writes G (2 for bf16, 4 over S for fp32); backward reads G twice (2 + 2, or 4 + 4). Before this backward
# (torch.mm over fp32 dL/dS, read twice, plus the dZ and Z·g buffers): 4 + 4 + 4 + 4 + 4 for every dtype, the
# matmuls in fp32.


@triton.jit
def _swav_scores_kernel(
    s_ptr, stride_sn, lse_part_ptr, best_part_ptr, rinv_ptr,  # outputs
    e_ptr, stride_en, stride_ed, p_ptr, stride_pk, stride_pd,  # inputs
    N, K, D, NKB, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
    ROW_STATS: tl.constexpr = True,
):
    """One BLOCK_N × BLOCK_K tile of S = (E @ Pᵀ) / ‖E‖ and, if ROW_STATS, its rows' partial log Σ exp(S/T), their
    partial maxima of S with the column they sit in, and 1/‖E‖ (the loss, the nearest prototypes and the backward
    need them for the batch; Sinkhorn alone reads the queue's scores).

    DOT (see dot_inputs): the operands' tensor-core input type; ‖e‖ is summed from E as stored, in fp32, and
    scales the fp32 accumulator, so the normalization itself is never rounded to the operand type.
    best_part: [2, N, NKB] fp32, the maxima then their columns (exact in fp32 below 2^24 prototypes).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    col_mask = cols < K
    rows64 = rows.to(tl.int64)
    e_ptrs = e_ptr + rows64[:, None] * stride_en + dd[None, :] * stride_ed
    p_ptrs = p_ptr + cols.to(tl.int64)[None, :] * stride_pk + dd[:, None] * stride_pd
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + dd) < D
        e = tl.load(e_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        pt = tl.load(p_ptrs, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        e32 = e.to(tl.float32)
        sumsq += tl.sum(e32 * e32, axis=1)
        acc = dot(dot_operand(e, DOT), dot_operand(pt, DOT), acc, DOT)
        e_ptrs += BLOCK_D * stride_ed
        p_ptrs += BLOCK_D * stride_pd
    rinv = 1.0 / tl.maximum(tl.sqrt_rn(sumsq), 1e-12)  # F.normalize's eps
    scores = acc * rinv[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(s_ptr + rows64[:, None] * stride_sn + cols[None, :], scores, mask=mask)
    if ROW_STATS:
        best, best_col = tl.max(tl.where(mask, scores, NEG), axis=1, return_indices=True)
        y = tl.where(mask, scores * inv_temp, NEG)
        y_max = tl.max(y, axis=1)
        lse = y_max + tl.log(tl.sum(tl.exp(y - y_max[:, None]), axis=1))
        part = rows64 * NKB + pid_k
        tl.store(lse_part_ptr + part, lse, mask=row_mask)
        tl.store(best_part_ptr + part, best, mask=row_mask)
        tl.store(best_part_ptr + N * NKB + part, (pid_k * BLOCK_K + best_col).to(tl.float32), mask=row_mask)
        tl.store(rinv_ptr + rows, rinv, mask=row_mask & (pid_k == 0))


@triton.jit
def _codes_tile(s, mask, rows, row_mask, cols, col_mask, log_u_ptr, rstat_ptr, slot, K, R, inv_eps):
    """Sinkhorn codes of assigned crop number `slot` on a tile of its scores s: softmax_k(S/eps + log u), through
    the row normalizers of Sinkhorn's last iteration (R rows per problem)."""
    log_u = tl.load(log_u_ptr + slot * K + cols, mask=col_mask, other=0.0)
    row_max, row_sum = row_normalizer(rstat_ptr + slot * 2 * R, rows, row_mask, R)
    y = tl.where(mask, s * inv_eps + log_u[None, :] - row_max[:, None], NEG)
    return tl.exp(y) / row_sum[:, None]


@triton.jit
def _swav_loss_kernel(
    grad_ptr, stride_gn, loss_part_ptr,  # outputs (grad_ptr may be s_ptr: each program overwrites only tiles it read)
    s_ptr, stride_sn, lse_ptr, log_u_ptr, rstat_ptr, table_ptr,  # inputs
    B, K, R, n_crops, n_assign, inv_eps, inv_temp, weight,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_GRAD: tl.constexpr, DOT: tl.constexpr,
):
    """Swapped cross-entropy (and dL/dS) on samples block program_id(0) × prototype block program_id(1), all crops.

    table: int32 [first row of each assigned crop (n_assign) | assigned slot of each crop, -1 if none (n_crops)].
    lse: log Σ_k exp(S/T) per row of S; log_u, rstat: Sinkhorn's potentials (sinkhorn_potentials, R rows each).
    """
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < B
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    # Sum of the codes of every assigned crop at these samples.
    q_sum = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for a in range(0, n_assign):
        r64 = (tl.load(table_ptr + a) + rows).to(tl.int64)
        s = tl.load(s_ptr + r64[:, None] * stride_sn + cols[None, :], mask=mask, other=0.0)
        q_sum += _codes_tile(s, mask, rows, row_mask, cols, col_mask, log_u_ptr, rstat_ptr, a, K, R, inv_eps)
    # Every crop v predicts the codes of the assigned crops other than itself.
    loss_rows = tl.zeros([BLOCK_B], dtype=tl.float32)
    for v in range(0, n_crops):
        slot = tl.load(table_ptr + n_assign + v)
        r = v * B + rows
        r64 = r.to(tl.int64)
        s = tl.load(s_ptr + r64[:, None] * stride_sn + cols[None, :], mask=mask, other=0.0)
        log_p = s * inv_temp - tl.load(lse_ptr + r, mask=row_mask, other=0.0)[:, None]
        target = q_sum
        n_target = n_assign
        if slot >= 0:  # v is assigned itself: it does not predict its own codes
            target = q_sum - _codes_tile(s, mask, rows, row_mask, cols, col_mask, log_u_ptr, rstat_ptr, slot, K, R,
                                         inv_eps)
            n_target = n_assign - 1
        loss_rows += tl.sum(tl.where(mask, -target * log_p, 0.0), axis=1)
        if WRITE_GRAD:  # G_v (see above): dL/dS_v / w, rounded as the backward's matmuls take it
            grad = dot_operand((n_target * tl.exp(log_p) - target) * inv_temp, DOT)
            tl.store(grad_ptr + r64[:, None] * stride_gn + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(loss_part_ptr + pid_b * tl.num_programs(1) + pid_k, tl.sum(loss_rows, axis=0) * weight)


@triton.jit
def _grad_embeddings_kernel(
    dz_part_ptr,  # output: SPLIT × N × D fp32 partial sums
    g_ptr, stride_gn, p_ptr, stride_pk, stride_pd,  # inputs: G (N × K, unit column stride), P
    N, K, D, K_PER_SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):
    """Partial G @ P of rows block program_id(0), prototypes slice program_id(1) (K_PER_SPLIT, a multiple of
    BLOCK_K) and D columns block program_id(2)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    dd = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    kk = tl.arange(0, BLOCK_K)
    row_mask = rows < N
    d_mask = dd < D
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + kk
        col_mask = cols < k_end
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gn + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        p = tl.load(p_ptr + cols.to(tl.int64)[:, None] * stride_pk + dd[None, :] * stride_pd,
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = dot(dot_operand(g, DOT), dot_operand(p, DOT), acc, DOT)
    out = dz_part_ptr + (split.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D + dd[None, :]
    tl.store(out, acc, mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _l2norm_backward_kernel(
    de_ptr, stride_den, z_ptr,  # outputs: dE (E's dtype, unit column stride), Z (contiguous N × D, matmul input type)
    dz_part_ptr, e_ptr, stride_en, stride_ed, rinv_ptr, grad_out_ptr,  # inputs: g a 1-element fp32
    N, D, SPLIT, weight,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_DE: tl.constexpr, WRITE_Z: tl.constexpr,
    DOT: tl.constexpr,
):
    """Backward of z = e / max(‖e‖, 1e-12) for BLOCK_N rows: dz = w·g·Σ_split partials,
    dE = (dz − z (z · dz)) / ‖e‖; and z rounded to the matmul input type."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (dd[None, :] < D)
    rows64 = rows.to(tl.int64)[:, None]
    e = tl.load(e_ptr + rows64 * stride_en + dd[None, :] * stride_ed, mask=mask, other=0.0).to(tl.float32)
    rinv = tl.load(rinv_ptr + rows, mask=row_mask, other=0.0)
    z = e * rinv[:, None]
    if WRITE_Z:
        tl.store(z_ptr + rows64 * D + dd[None, :], dot_operand(z, DOT).to(z_ptr.dtype.element_ty), mask=mask)
    if WRITE_DE:
        dz = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for split in range(0, SPLIT):
            dz += tl.load(dz_part_ptr + (split * N + rows64) * D + dd[None, :], mask=mask, other=0.0)
        dz *= tl.load(grad_out_ptr) * weight
        # Below F.normalize's eps the denominator is the constant eps: no projection.
        clamped = tl.sqrt_rn(tl.sum(e * e, axis=1)) < 1e-12
        proj = tl.where(clamped, 0.0, tl.sum(z * dz, axis=1))
        de = (dz - z * proj[:, None]) * rinv[:, None]
        tl.store(de_ptr + rows64 * stride_den + dd[None, :], de.to(de_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_prototypes_kernel(
    dp_ptr, stride_dpk,  # output: dP (P's dtype, unit column stride)
    g_ptr, stride_gn, z_ptr, grad_out_ptr,  # inputs: G (N × K, unit column stride), Z (contiguous N × D)
    N, K, D, weight,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
):
    """dP = w·g·Gᵀ @ Z for prototypes block program_id(0) and D columns block program_id(1)."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = tl.arange(0, BLOCK_N)
    col_mask = cols < K
    d_mask = dd < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + nn
        row_mask = rows < N
        gt = tl.load(g_ptr + rows.to(tl.int64)[None, :] * stride_gn + cols[:, None],
                     mask=col_mask[:, None] & row_mask[None, :], other=0.0)  # Gᵀ tile: BLOCK_K × BLOCK_N
        z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + dd[None, :], mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0)
        acc = dot(dot_operand(gt, DOT), dot_operand(z, DOT), acc, DOT)
    acc *= tl.load(grad_out_ptr) * weight
    tl.store(dp_ptr + cols.to(tl.int64)[:, None] * stride_dpk + dd[None, :], acc.to(dp_ptr.dtype.element_ty),
             mask=col_mask[:, None] & d_mask[None, :])


def head_config(n: int, k: int, d: int, b: int, embeddings_dtype, prototypes_dtype) -> dict:
    """Block sizes and matmul input type of the head's kernels (the one place they are chosen; arithmetic for
    H100/H200, not measured).

    dot: what the matmuls multiply (dot_inputs: bf16 for bf16 embeddings × fp32 prototypes); grad_dtype: how the
    forward stores G = dL/dS / w for the backward's matmuls.
    scores: 64 × 128 output tiles (fp32 accumulator: 32 registers per thread at 8 warps) over D in 64-element steps
    for 16-bit operands, 32-element steps for fp32 (24 KB of operands per pipeline stage either way); programs along N
    are adjacent in launch order, so the row blocks of one P tile hit L2. loss: (16 or 32 samples) × 128
    prototypes; at SEER's per-GPU shape (B = 16, K = 16,000) that is 125 programs, about one wave of 132 SMs.
    grad_embeddings: 64 rows × up to 256 D columns (a 64-register fp32 accumulator at 8 warps) over 64 (16-bit) or
    32 (fp32) prototypes per step: 40 KB of operands per stage. grad_prototypes: 128 (16-bit) or 64 (fp32)
    prototypes × up to 256 D columns over 64 or 32 rows per step: 48 or 40 KB per stage. norm backward: whole rows.
    """
    dot = dot_inputs(embeddings_dtype, prototypes_dtype)
    sixteen_bit = dot in ("bf16", "fp16")
    grad_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dot, torch.float32)
    scores = dict(BLOCK_N=pow2(n, 16, 64), BLOCK_K=pow2(k, 16, 128), BLOCK_D=pow2(d, 16, 64 if sixteen_bit else 32),
                  DOT=dot)
    scores["num_warps"] = num_warps(scores["BLOCK_N"] * scores["BLOCK_K"])
    loss = dict(BLOCK_B=pow2(b, 16, 32), BLOCK_K=pow2(k, 32, 128))
    loss["num_warps"] = num_warps(loss["BLOCK_B"] * loss["BLOCK_K"])
    block_d = triton.next_power_of_2(d)
    norm = dict(BLOCK_N=pow2(MAX_TILE // block_d, 1, 64), BLOCK_D=block_d)
    norm["num_warps"] = num_warps(norm["BLOCK_N"] * block_d)
    grad_e = dict(BLOCK_N=64, BLOCK_K=64 if sixteen_bit else 32, BLOCK_D=pow2(d, 16, 256))
    grad_e["num_warps"] = num_warps(grad_e["BLOCK_N"] * grad_e["BLOCK_D"])
    grad_p = dict(BLOCK_K=128 if sixteen_bit else 64, BLOCK_N=64 if sixteen_bit else 32, BLOCK_D=pow2(d, 16, 256))
    grad_p["num_warps"] = num_warps(grad_p["BLOCK_K"] * grad_p["BLOCK_D"])
    return dict(dot=dot, grad_dtype=grad_dtype, scores=scores, loss=loss, norm=norm, grad_embeddings=grad_e,
                grad_prototypes=grad_p)


def loss_weight(b: int, n_crops: int, n_assign: int) -> float:
    """w: dL/dS = w·G (the mean over samples, predicting crops and assigned crops)."""
    return 1.0 / (b * (n_crops - 1) * n_assign)


@functools.lru_cache(maxsize=64)
def _crop_table(device, n_crops, b, crops_for_assign):
    """int32 [first row of each assigned crop | each crop's slot in crops_for_assign, -1 if none], on device.

    Cached: building it is a copy from pageable host memory, which would wait for the GPU stream to drain.
    """
    slots = [crops_for_assign.index(c) if c in crops_for_assign else -1 for c in range(n_crops)]
    return torch.tensor([a * b for a in crops_for_assign] + slots, dtype=torch.int32, device=device)


def _queue_scores(queue, prototypes, b, dot):
    """normalize(queue) @ Pᵀ as an (n_assign·L) × K fp32 matrix: the extra Sinkhorn rows of the assigned crops.

    dot: the batch's matmul input type, so that queue and batch rows of one Sinkhorn problem are rounded alike.
    """
    n_assign, length, d = queue.shape
    k = prototypes.shape[0]
    rows = queue.reshape(n_assign * length, d)  # a view unless the queue's strides forbid it (then a copy)
    sc = head_config(n_assign * length, k, d, b, queue.dtype, prototypes.dtype)["scores"]
    nkb = triton.cdiv(k, sc["BLOCK_K"])
    scores = torch.empty(n_assign * length, k, device=queue.device, dtype=torch.float32)
    _swav_scores_kernel[(triton.cdiv(n_assign * length, sc["BLOCK_N"]), nkb)](
        scores, scores.stride(0), scores, scores, scores,  # no row statistics: the placeholders are never written
        rows, rows.stride(0), rows.stride(1), prototypes, prototypes.stride(0), prototypes.stride(1),
        n_assign * length, k, d, nkb, 1.0,
        BLOCK_N=sc["BLOCK_N"], BLOCK_K=sc["BLOCK_K"], BLOCK_D=sc["BLOCK_D"], DOT=dot, ROW_STATS=False,
        num_warps=sc["num_warps"],
    )
    return scores


@torch.compiler.disable
def swav_loss_forward(embeddings, prototypes, *, n_crops, crops_for_assign, temperature, epsilon, iterations,
                      group, need_grad, queue=None, nearest=False):
    """(loss: 0-d fp32, G: N × K or None, 1/‖E‖: N fp32 or None, nearest prototypes or None).

    G (dL/dS / loss_weight, in head_config's grad_dtype) and 1/‖E‖ for swav_loss_backward if need_grad; nearest
    (int64 n_assign × B, see swav_loss) if nearest. queue: None or a non-empty n_assign × L × D tensor (see
    swav_loss), read without gradient.
    """
    n, d = embeddings.shape
    k = prototypes.shape[0]
    b = n // n_crops
    n_assign = len(crops_for_assign)
    dev = embeddings.device
    cfg = head_config(n, k, d, b, embeddings.dtype, prototypes.dtype)

    sc = cfg["scores"]
    nkb_scores = triton.cdiv(k, sc["BLOCK_K"])
    scores = torch.empty(n, k, device=dev, dtype=torch.float32)
    lse_part = torch.empty(n, nkb_scores, device=dev, dtype=torch.float32)
    best_part = torch.empty(2, n, nkb_scores, device=dev, dtype=torch.float32)
    rinv = torch.empty(n, device=dev, dtype=torch.float32)
    _swav_scores_kernel[(triton.cdiv(n, sc["BLOCK_N"]), nkb_scores)](
        scores, scores.stride(0), lse_part, best_part, rinv,
        embeddings, embeddings.stride(0), embeddings.stride(1), prototypes, prototypes.stride(0), prototypes.stride(1),
        n, k, d, nkb_scores, 1.0 / temperature,
        BLOCK_N=sc["BLOCK_N"], BLOCK_K=sc["BLOCK_K"], BLOCK_D=sc["BLOCK_D"], DOT=sc["DOT"],
        num_warps=sc["num_warps"],
    )
    lse = torch.logsumexp(lse_part, dim=1)  # log Σ_k exp(S/T) per row, from the scoring pass's partials
    nearest_rows = None
    if nearest:
        best, best_col = best_part.view(2, n_crops, b, nkb_scores)[:, list(crops_for_assign)]
        nearest_rows = best_col.gather(2, best.argmax(dim=2, keepdim=True)).squeeze(2).long()

    table = _crop_table(dev, n_crops, b, crops_for_assign)
    queue_scores = None if queue is None else _queue_scores(queue, prototypes, b, cfg["dot"])
    log_u, rstat, _ = sinkhorn_potentials(scores, table[:n_assign], b, epsilon=epsilon, iterations=iterations,
                                          group=group, extra_rows=queue_scores)

    lc = cfg["loss"]
    grid = (triton.cdiv(b, lc["BLOCK_B"]), triton.cdiv(k, lc["BLOCK_K"]))
    loss_part = torch.empty(grid[0] * grid[1], device=dev, dtype=torch.float32)
    grad = scores  # overwritten in place when G is fp32
    if need_grad and cfg["grad_dtype"] != torch.float32:
        grad = torch.empty(n, k, device=dev, dtype=cfg["grad_dtype"])
    _swav_loss_kernel[grid](
        grad, grad.stride(0), loss_part, scores, scores.stride(0), lse, log_u, rstat, table,
        b, k, rstat.shape[2], n_crops, n_assign, 1.0 / epsilon, 1.0 / temperature, loss_weight(b, n_crops, n_assign),
        BLOCK_B=lc["BLOCK_B"], BLOCK_K=lc["BLOCK_K"], WRITE_GRAD=need_grad, DOT=cfg["dot"],
        num_warps=lc["num_warps"],
    )
    loss = loss_part.sum()
    return (loss, grad if need_grad else None, rinv if need_grad else None, nearest_rows)


def grad_embeddings_split(n: int, k: int, d: int, blocks: dict, grad_bytes: int, device) -> tuple[int, int]:
    """(SPLIT, prototypes per slice) of _grad_embeddings_kernel with head_config's `blocks`: enough programs for one
    wave of the GPU's SMs when N is small, at most one slice per BLOCK_K prototypes, and partial sums
    (SPLIT × N × D fp32) no larger than G itself (grad_bytes per element)."""
    programs = triton.cdiv(n, blocks["BLOCK_N"]) * triton.cdiv(d, blocks["BLOCK_D"])
    split = max(1, min(triton.cdiv(sm_count(device), programs), triton.cdiv(k, blocks["BLOCK_K"]),
                       k * grad_bytes // (d * 4)))
    per_split = triton.cdiv(triton.cdiv(k, split), blocks["BLOCK_K"]) * blocks["BLOCK_K"]
    return triton.cdiv(k, per_split), per_split


@torch.compiler.disable
def swav_loss_backward(grad_loss, grad, embeddings, prototypes, rinv, weight, need_embeddings, need_prototypes):
    """(dL/dE in E's dtype or None, dL/dP in P's dtype or None) from the forward's G and grad_output.

    weight: loss_weight of the forward (dL/dS = weight·G).
    """
    n, d = embeddings.shape
    k = prototypes.shape[0]
    dev = embeddings.device
    cfg = head_config(n, k, d, 1, embeddings.dtype, prototypes.dtype)
    g = grad_loss.detach().to(torch.float32).reshape(1)
    de = dz_part = None
    split = 1
    if need_embeddings:
        ge = cfg["grad_embeddings"]
        split, per_split = grad_embeddings_split(n, k, d, ge, grad.element_size(), dev)
        dz_part = torch.empty(split, n, d, device=dev, dtype=torch.float32)
        _grad_embeddings_kernel[(triton.cdiv(n, ge["BLOCK_N"]), split, triton.cdiv(d, ge["BLOCK_D"]))](
            dz_part, grad, grad.stride(0), prototypes, prototypes.stride(0), prototypes.stride(1), n, k, d, per_split,
            BLOCK_N=ge["BLOCK_N"], BLOCK_K=ge["BLOCK_K"], BLOCK_D=ge["BLOCK_D"], DOT=cfg["dot"],
            num_warps=ge["num_warps"],
        )
        de = torch.empty(n, d, device=dev, dtype=embeddings.dtype)
    z = torch.empty(n, d, device=dev, dtype=cfg["grad_dtype"]) if need_prototypes else None
    nc = cfg["norm"]
    placeholder = rinv
    _l2norm_backward_kernel[(triton.cdiv(n, nc["BLOCK_N"]),)](
        de if need_embeddings else placeholder, de.stride(0) if need_embeddings else 0,
        z if need_prototypes else placeholder, dz_part if need_embeddings else placeholder,
        embeddings, embeddings.stride(0), embeddings.stride(1), rinv, g, n, d, split, weight,
        BLOCK_N=nc["BLOCK_N"], BLOCK_D=nc["BLOCK_D"], WRITE_DE=need_embeddings, WRITE_Z=need_prototypes,
        DOT=cfg["dot"], num_warps=nc["num_warps"],
    )
    dp = None
    if need_prototypes:
        gp = cfg["grad_prototypes"]
        dp = torch.empty(k, d, device=dev, dtype=prototypes.dtype)
        _grad_prototypes_kernel[(triton.cdiv(k, gp["BLOCK_K"]), triton.cdiv(d, gp["BLOCK_D"]))](
            dp, dp.stride(0), grad, grad.stride(0), z, g, n, k, d, weight,
            BLOCK_K=gp["BLOCK_K"], BLOCK_N=gp["BLOCK_N"], BLOCK_D=gp["BLOCK_D"], DOT=cfg["dot"],
            num_warps=gp["num_warps"],
        )
    return de, dp


class SwAVLossFunction(torch.autograd.Function):
    """Triton SwAV loss: forward computes the loss and G = dL/dS / w (and the nearest prototypes if asked: a second
    output, without gradient); backward chains G into E and P."""

    @staticmethod
    def forward(ctx, embeddings, prototypes, queue, n_crops, crops_for_assign, temperature, epsilon, iterations,
                group, nearest):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(embeddings.device.type, enabled=False):  # the kernels choose their own precision
            loss, grad, rinv, nearest_rows = swav_loss_forward(
                embeddings, prototypes, n_crops=n_crops, crops_for_assign=crops_for_assign, temperature=temperature,
                epsilon=epsilon, iterations=iterations, group=group, need_grad=need_grad, queue=queue,
                nearest=nearest,
            )
        if need_grad:
            ctx.save_for_backward(embeddings, prototypes, grad, rinv)
            ctx.weight = loss_weight(embeddings.shape[0] // n_crops, n_crops, len(crops_for_assign))
        if nearest:
            ctx.mark_non_differentiable(nearest_rows)
            return loss, nearest_rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss, *grad_nearest):
        embeddings, prototypes, grad, rinv = ctx.saved_tensors
        with torch.autocast(embeddings.device.type, enabled=False):  # the kernels choose their own precision
            de, dp = swav_loss_backward(grad_loss, grad, embeddings, prototypes, rinv, ctx.weight,
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return de, dp, None, None, None, None, None, None, None, None  # the queue is detached: no gradient


@torch.compiler.disable  # torch.compile of a caller runs this eagerly (a graph break), kernels and all
def _swav_loss_triton(embeddings, prototypes, queue, n_crops, crops_for_assign, temperature, epsilon, iterations,
                      group, nearest):
    return SwAVLossFunction.apply(embeddings, prototypes, queue, n_crops, crops_for_assign, temperature, epsilon,
                                  iterations, group, nearest)

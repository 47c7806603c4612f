"""SwAV's distributed Sinkhorn-Knopp: turn prototype scores into balanced soft assignments (codes).

The reference runs in the log domain so that exp(scores / epsilon) never has to be formed: plain SwAV
overflows (fp16, small epsilon) or divides 0 by 0 (a sample far below the global maximum).
"""

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._backend import resolve_backend
from ._triton import MAX_TILE, NEG, num_warps, pow2


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
    backend: "torch" (the reference), "triton" (fused kernels: float16/bfloat16/float32 inputs, fp32 compute; CUDA
    tensors, or CPU tensors in Triton's interpreter), or "auto" ("triton" for CUDA tensors unless an input is
    float64, "torch" otherwise).
    """
    if resolve_backend(backend, scores, op="sinkhorn") == "triton":
        _check_args(scores, epsilon, iterations)
        return _sinkhorn_triton(scores, epsilon, iterations, group)
    return sinkhorn_reference(scores, epsilon=epsilon, iterations=iterations, group=group)


# ---------------------------------------------------------------------------------------------------------------
# Triton: the same log-domain iteration, one pass over the scores per iteration.
#
# A problem is a B × K block of scores x = S / epsilon (fp32 in registers, S in its storage dtype). The state
# between passes is the prototype potential log u (K-vector) and, for every sample row b and column block j of
# BLOCK_K prototypes, the partial statistics of y = x + log u: rmax[b, j] = max_{k in j} y[b, k] and
# rsum[b, j] = Σ_{k in j} exp(y[b, k] - rmax[b, j]). A program owns one column block and all B rows of its problem:
#   1. sample step of the previous iteration: log v[b] = -log Σ_k exp(y[b, k]), merging the partials of every
#      column block (none on the first pass, where v = 1);
#   2. prototype step: log u[k] = -log Σ_b exp(x[b, k] + log v[b])  (online max-shifted sums over row chunks);
#   3. partials of the next sample step, rmax/rsum[b, j] for its own columns (a second sweep over the tile it
#      just read, served by L1/L2: HBM sees the scores once per iteration).
# With a process group, step 2's column sums must be all-reduced before step 3, so a pass stops after writing
# the local column maximum and max-shifted sum (2 K-vectors), the launcher all-reduces them (MAX, then SUM of
# the rescaled sums, as the reference does), and a second pass does step 3. Codes = exp(y - max_k y) / Σ_k exp(..)
# (the reference's softmax: max-relative, so rows sum to 1 even where |y| is large and its fp32 ulp coarse) are
# written by one last elementwise pass; SwAV's loss computes them on the fly instead (kernels/swav_head.py).
#
# A problem may take L extra rows from a second buffer (SwAV's queue: scores of past embeddings, appended to every
# assigned crop's batch). They enter the prototype sums like the problem's own rows and keep their own row partials
# (a second rpart), so readers of the problem's own codes (the loss kernel, the codes kernel) never see them.


@triton.jit
def _row_stats(rpart_ptr, rows, row_mask, B, NKB, BLOCK_B: tl.constexpr, MERGE: tl.constexpr):
    """(max_k y, Σ_k exp(y - max)) of `rows`, merged from the NKB column blocks' partials, MERGE at a time.

    rpart_ptr: one problem's [2, B, NKB] partials (maxima, then max-relative sums). Masked rows get (NEG, 1).
    """
    m = tl.full([BLOCK_B], NEG, tl.float32)
    s = tl.zeros([BLOCK_B], tl.float32)
    for j0 in range(0, NKB, MERGE):
        j = j0 + tl.arange(0, MERGE)
        mask = row_mask[:, None] & (j[None, :] < NKB)
        offs = rows[:, None] * NKB + j[None, :]
        part_max = tl.load(rpart_ptr + offs, mask=mask, other=NEG)
        part_sum = tl.load(rpart_ptr + B * NKB + offs, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(part_max, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(part_sum * tl.exp(part_max - m_new[:, None]), axis=1)
        m = m_new
    return m, tl.where(row_mask, s, 1.0)


@triton.jit
def _fold_column_stats(m, s, x_ptr, stride_xb, stride_xk, rpart_ptr, n_rows, NKB, cols, col_mask, inv_eps,
                       FIRST: tl.constexpr, BLOCK_B: tl.constexpr, MERGE: tl.constexpr):
    """Fold x / eps + log v of rows 0 .. n_rows - 1 of one row source into the running column max m and
    max-shifted sum s (prototype step). rpart_ptr: that source's [2, n_rows, NKB] partials of the previous pass."""
    for b0 in range(0, n_rows, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * stride_xb + cols[None, :] * stride_xk
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_eps
        if not FIRST:
            row_max, row_sum = _row_stats(rpart_ptr, rows, row_mask, n_rows, NKB, BLOCK_B, MERGE)
            x -= (row_max + tl.log(row_sum))[:, None]  # + log v
        x = tl.where(mask, x, NEG)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m = m_new
    return m, s


@triton.jit
def _write_row_partials(rpart_ptr, x_ptr, stride_xb, stride_xk, log_u, n_rows, NKB, pid_k, cols, col_mask, inv_eps,
                        BLOCK_B: tl.constexpr):
    """Partials rmax/rsum[b, pid_k] of y = x / eps + log u for rows 0 .. n_rows - 1 of one row source."""
    for b0 in range(0, n_rows, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * stride_xb + cols[None, :] * stride_xk
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_eps + log_u[None, :]
        y = tl.where(mask, y, NEG)
        row_max = tl.max(y, axis=1)
        row_sum = tl.sum(tl.exp(y - row_max[:, None]), axis=1)
        tl.store(rpart_ptr + rows * NKB + pid_k, row_max, mask=row_mask)
        tl.store(rpart_ptr + n_rows * NKB + rows * NKB + pid_k, row_sum, mask=row_mask)


@triton.jit
def _sinkhorn_pass_kernel(
    log_u_ptr, rpart_out_ptr, extra_rpart_out_ptr, colmax_ptr, colsum_ptr,  # outputs
    x_ptr, stride_xb, stride_xk, row0_ptr, rpart_in_ptr,  # inputs: the problems' own rows
    extra_ptr, stride_eb, stride_ek, extra_rpart_in_ptr,  # inputs: the L extra rows of every problem
    B, L, K, NKB, inv_eps,
    FIRST: tl.constexpr, COL_STEP: tl.constexpr, ROW_STEP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, MERGE: tl.constexpr,
):
    """One Sinkhorn pass over column block program_id(0) of problem program_id(1) (see the comment above).

    Problem p: rows row0[p] .. row0[p] + B - 1 of x, then rows p·L .. p·L + L - 1 of extra (none when L = 0).
    COL_STEP and ROW_STEP: a whole iteration (no communication). COL_STEP only: write the local column
    statistics (colmax, colsum) for the all-reduce. ROW_STEP only: log u from the all-reduced statistics (then
    colmax and colsum are inputs).
    """
    pid_k = tl.program_id(0)
    problem = tl.program_id(1).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    x_ptr += tl.load(row0_ptr + problem).to(tl.int64) * stride_xb
    extra_ptr += problem * L * stride_eb
    kvec = problem * K + cols  # this problem's K-vectors
    rpart_in_ptr += problem * 2 * B * NKB
    rpart_out_ptr += problem * 2 * B * NKB
    extra_rpart_in_ptr += problem * 2 * L * NKB
    extra_rpart_out_ptr += problem * 2 * L * NKB
    if COL_STEP:
        m = tl.full([BLOCK_K], NEG, tl.float32)
        s = tl.zeros([BLOCK_K], tl.float32)
        m, s = _fold_column_stats(m, s, x_ptr, stride_xb, stride_xk, rpart_in_ptr, B, NKB, cols, col_mask, inv_eps,
                                  FIRST, BLOCK_B, MERGE)
        m, s = _fold_column_stats(m, s, extra_ptr, stride_eb, stride_ek, extra_rpart_in_ptr, L, NKB, cols, col_mask,
                                  inv_eps, FIRST, BLOCK_B, MERGE)
        if ROW_STEP:
            log_u = -(m + tl.log(s))
        else:
            tl.store(colmax_ptr + kvec, m, mask=col_mask)
            tl.store(colsum_ptr + kvec, s, mask=col_mask)
    else:
        gmax = tl.load(colmax_ptr + kvec, mask=col_mask, other=0.0)
        gsum = tl.load(colsum_ptr + kvec, mask=col_mask, other=1.0)
        log_u = -(gmax + tl.log(gsum))
    if ROW_STEP:
        tl.store(log_u_ptr + kvec, log_u, mask=col_mask)
        _write_row_partials(rpart_out_ptr, x_ptr, stride_xb, stride_xk, log_u, B, NKB, pid_k, cols, col_mask, inv_eps,
                            BLOCK_B)
        _write_row_partials(extra_rpart_out_ptr, extra_ptr, stride_eb, stride_ek, log_u, L, NKB, pid_k, cols,
                            col_mask, inv_eps, BLOCK_B)


@triton.jit
def _sinkhorn_codes_kernel(
    codes_ptr, stride_cb,  # output (float32, unit column stride)
    x_ptr, stride_xb, stride_xk, log_u_ptr, rpart_ptr,  # inputs
    B, K, NKB, inv_eps,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, MERGE: tl.constexpr,
):
    """codes = softmax_k(y) = exp(y - max_k y) / Σ_k exp(y - max_k y), y = x / eps + log u, on one B × K tile."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    col_mask = cols < K
    row_mask = rows < B
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + rows64 * stride_xb + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    log_u = tl.load(log_u_ptr + cols, mask=col_mask, other=0.0)
    row_max, row_sum = _row_stats(rpart_ptr, rows, row_mask, B, NKB, BLOCK_B, MERGE)
    y = tl.where(mask, x * inv_eps + log_u[None, :] - row_max[:, None], NEG)
    codes = tl.exp(y) / row_sum[:, None]
    tl.store(codes_ptr + rows64 * stride_cb + cols[None, :], codes, mask=mask)


MAX_MERGE = 64  # column-block partials merged per step of _row_stats (a BLOCK_B × 64 tile)


def sinkhorn_config(rows: int, k: int) -> dict:
    """Block sizes of the pass kernels for problems of `rows` × `k` (the one place they are chosen).

    About 64 column blocks per problem: SwAV's 2 assigned crops then fill ~one wave of 132 SMs, and merging the
    partials (rows × NKB reads per program) costs NKB / BLOCK_K ≈ k / BLOCK_K² of the tile reads (24% at
    K = 16,000). Chosen by arithmetic.
    """
    block_k = pow2(triton.cdiv(k, 64), 32, 256)
    block_b = pow2(rows, 16, max(16, MAX_TILE // block_k))
    nkb = triton.cdiv(k, block_k)
    return dict(BLOCK_B=block_b, BLOCK_K=block_k, MERGE=pow2(nkb, min(16, MAX_MERGE), MAX_MERGE), nkb=nkb,
                num_warps=num_warps(block_b * block_k))


@torch.compiler.disable
def sinkhorn_potentials(x: torch.Tensor, row0: torch.Tensor, rows: int, *, epsilon: float, iterations: int,
                        group, extra_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run Sinkhorn on len(row0) problems: rows row0[p] .. row0[p] + rows - 1 of x (any float dtype, 2-D).

    extra_rows: None, or a (P·L) × K score matrix (any float dtype and strides) whose rows p·L .. p·L + L - 1
    join problem p: they count in its prototype sums (over every rank of `group`), but no codes are returned for
    them. row0: int32 tensor on x's device. Returns (log u: P × K fp32, rpart: P × 2 × rows × NKB fp32 partial
    row maxima and sums of y = x / epsilon + log u for the problems' own rows, config); codes[b] = softmax(y[b])
    (see _row_stats).
    """
    problems, k = row0.numel(), x.shape[1]
    extra_len = 0 if extra_rows is None else extra_rows.shape[0] // problems
    if extra_rows is not None and extra_rows.shape != (problems * extra_len, k):
        raise ValueError(f"sinkhorn_potentials: extra_rows must be (P·L) × K = ({problems}·L) × {k}, "
                         f"got shape {tuple(extra_rows.shape)}")
    cfg = sinkhorn_config(max(rows, extra_len), k)  # each row source is swept on its own, BLOCK_B rows at a time
    nkb = cfg["nkb"]
    meta = dict(BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], MERGE=cfg["MERGE"], num_warps=cfg["num_warps"])
    f32 = dict(device=x.device, dtype=torch.float32)
    log_u = torch.empty(problems, k, **f32)
    rpart = torch.empty(2, problems, 2, rows, nkb, **f32)  # double-buffered: a pass reads one, writes the other
    if extra_len:
        extra, extra_rpart = extra_rows, torch.empty(2, problems, 2, extra_len, nkb, **f32)
    else:
        extra, extra_rpart = x, rpart  # placeholders: the kernels sweep no extra rows
    colmax = colsum = log_u  # unused placeholders without a group
    if group is not None:
        colmax, colsum = torch.empty(problems, k, **f32), torch.empty(problems, k, **f32)
    grid = (nkb, problems)
    inv_eps = 1.0 / epsilon
    for it in range(iterations):
        rpart_out, extra_rpart_out = rpart[it % 2], extra_rpart[it % 2]
        args = (x, x.stride(0), x.stride(1), row0, rpart[(it + 1) % 2],
                extra, extra.stride(0), extra.stride(1), extra_rpart[(it + 1) % 2], rows, extra_len, k, nkb, inv_eps)
        if group is None:
            _sinkhorn_pass_kernel[grid](log_u, rpart_out, extra_rpart_out, colmax, colsum, *args,
                                        FIRST=it == 0, COL_STEP=True, ROW_STEP=True, **meta)
            continue
        _sinkhorn_pass_kernel[grid](log_u, rpart_out, extra_rpart_out, colmax, colsum, *args,
                                    FIRST=it == 0, COL_STEP=True, ROW_STEP=False, **meta)
        # The only communication: prototype sums over every rank's samples (2 all-reduces of K floats each).
        gmax = colmax.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        colsum.mul_(torch.exp(colmax - gmax))
        dist.all_reduce(colsum, op=dist.ReduceOp.SUM, group=group)
        _sinkhorn_pass_kernel[grid](log_u, rpart_out, extra_rpart_out, gmax, colsum, *args,
                                    FIRST=it == 0, COL_STEP=False, ROW_STEP=True, **meta)
    return log_u, rpart[(iterations - 1) % 2], cfg


@torch.compiler.disable
def sinkhorn_forward(scores: torch.Tensor, *, epsilon: float, iterations: int, group) -> torch.Tensor:
    """Codes of a B × K score matrix (float16/bfloat16/float32, any strides) as a contiguous float32 B × K."""
    b, k = scores.shape
    row0 = torch.zeros(1, dtype=torch.int32, device=scores.device)
    log_u, rpart, cfg = sinkhorn_potentials(scores, row0, b, epsilon=epsilon, iterations=iterations, group=group)
    codes = torch.empty(b, k, device=scores.device, dtype=torch.float32)
    grid = (cfg["nkb"], triton.cdiv(b, cfg["BLOCK_B"]))
    _sinkhorn_codes_kernel[grid](codes, codes.stride(0), scores, scores.stride(0), scores.stride(1), log_u, rpart[0],
                                 b, k, cfg["nkb"], 1.0 / epsilon, BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"],
                                 MERGE=cfg["MERGE"], num_warps=cfg["num_warps"])
    return codes


class SinkhornFunction(torch.autograd.Function):
    """Triton Sinkhorn behind autograd: the codes are constants (no gradient), like the reference's."""

    @staticmethod
    def forward(ctx, scores, epsilon, iterations, group):
        codes = sinkhorn_forward(scores, epsilon=epsilon, iterations=iterations, group=group)
        ctx.mark_non_differentiable(codes)
        return codes

    @staticmethod
    def backward(ctx, grad_codes):  # pragma: no cover - codes are marked non-differentiable
        return None, None, None, None


@torch.compiler.disable  # torch.compile of a caller runs this eagerly (a graph break), kernels and all
def _sinkhorn_triton(scores, epsilon, iterations, group):
    return SinkhornFunction.apply(scores, epsilon, iterations, group)

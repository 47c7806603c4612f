"""SwAV's distributed Sinkhorn-Knopp: turn prototype scores into balanced soft assignments (codes).

The reference runs in the log domain so that exp(scores / epsilon) never has to be formed: plain SwAV
overflows (fp16, small epsilon) or divides 0 by 0 (a sample far below the global maximum).
"""

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._backend import resolve_backend
from ._triton import L2_BYTES, MAX_TILE, NEG, SM_COUNT, num_warps, pow2, sm_count


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
# Triton: the same log-domain iteration, over the scores once or twice per iteration (see below).
#
# A problem is R rows × K columns of x = S / epsilon (fp32 in registers, S in its storage dtype). The state between
# iterations is the prototype potential log u (K-vector) and every row's normalizer in two parts, rstat[b] =
# (max_k y[b, k], Σ_k exp(y[b, k] - max)), y = x + log u (so log v = -(max + log Σ)). One iteration:
#   column pass   log u[k] = -log Σ_b exp(x[b, k] + log v[b])  (v = 1 on the first pass), online
#                 max-shifted sums; each program owns BLOCK_K columns and CHUNK rows (one chunk unless the grid of
#                 column blocks alone would leave SMs idle) and writes its partial column statistics (max, sum).
#   row pass      log u from the column partials (merged by every program of a column block: N_PARTS × BLOCK_K
#                 reads), then the partials of y over its own columns for its rows: rpart[b, j] = (max_{k in j} y,
#                 Σ_{k in j} exp(y - max)).
#   row merge     rstat[b] from the NKB column blocks' partials: each row's normalizer once per iteration.
# With one row chunk and no process group, the column and row passes are one program: it sweeps its column strip
# twice, the second time from L1/L2 where the strips of one wave fit. With a process group the column statistics are
# all-reduced between the two passes (MAX, then SUM of the rescaled sums, as the reference does).
# Codes = exp(y - max) / Σ (the reference's softmax: max-relative, so rows sum to 1 even where |y| is large and its
# fp32 ulp coarse) are written by one last elementwise pass; SwAV's loss computes them on the fly instead
# (kernels/swav_head.py).
#
# A problem may take L extra rows from a second buffer (SwAV's queue: scores of past embeddings, appended to every
# assigned crop's batch). They are rows B .. B + L - 1 of the problem: they enter the prototype sums like its own
# rows and have their own rstat, and readers of the problem's own codes (the loss kernel, the codes kernel) read
# rows 0 .. B - 1 only.


@triton.jit
def row_normalizer(rstat_ptr, rows, row_mask, R):
    """(max_k y, Σ_k exp(y - max)) of `rows` from one problem's rstat ([2, R]); masked rows get (0, 1)."""
    row_max = tl.load(rstat_ptr + rows, mask=row_mask, other=0.0)
    return row_max, tl.load(rstat_ptr + R + rows, mask=row_mask, other=1.0)


@triton.jit
def _fold_column_stats(m, s, x_ptr, stride_xb, stride_xk, rstat_ptr, R, lo, hi, cols, col_mask, inv_eps,
                       FIRST: tl.constexpr, BLOCK_B: tl.constexpr):
    """Fold x + log v of rows lo .. hi - 1 of one row source into the running column max m and max-shifted sum s.
    rstat_ptr: that source's row 0 in the problem's rstat."""
    for b0 in range(lo, hi, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < hi
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * stride_xb + cols[None, :] * stride_xk
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_eps
        if not FIRST:
            row_max, row_sum = row_normalizer(rstat_ptr, rows, row_mask, R)
            x -= (row_max + tl.log(row_sum))[:, None]
        x = tl.where(mask, x, NEG)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m = m_new
    return m, s


@triton.jit
def _write_row_partials(rpart_ptr, R, x_ptr, stride_xb, stride_xk, log_u, lo, hi, NKB, pid_k, cols, col_mask, inv_eps,
                        BLOCK_B: tl.constexpr):
    """Partials rmax/rsum[b, pid_k] of y = x + log u for rows lo .. hi - 1 of one row source. rpart_ptr: that
    source's row 0 in the problem's [2, R, NKB] partials."""
    for b0 in range(lo, hi, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < hi
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * stride_xb + cols[None, :] * stride_xk
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_eps + log_u[None, :]
        y = tl.where(mask, y, NEG)
        row_max = tl.max(y, axis=1)
        row_sum = tl.sum(tl.exp(y - row_max[:, None]), axis=1)
        tl.store(rpart_ptr + rows * NKB + pid_k, row_max, mask=row_mask)
        tl.store(rpart_ptr + R * NKB + rows * NKB + pid_k, row_sum, mask=row_mask)


@triton.jit
def _sinkhorn_pass_kernel(
    log_u_ptr, rpart_ptr, cpart_ptr,  # outputs (cpart: the column partials, an input of a row pass alone)
    x_ptr, stride_xb, stride_xk, row0_ptr,  # inputs: the problems' own rows
    extra_ptr, stride_eb, stride_ek,  # inputs: the L extra rows of every problem
    rstat_ptr,  # input: every row's normalizer of the previous iteration ([P, 2, R])
    B, L, K, NKB, CHUNK, N_PARTS, inv_eps,
    FIRST: tl.constexpr, COL_STEP: tl.constexpr, ROW_STEP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Column block program_id(0), row chunk program_id(1) (rows CHUNK·c .. CHUNK·(c + 1) - 1 of B + L) of problem
    program_id(2), in one Sinkhorn iteration (see the comment above).

    Problem p: rows row0[p] .. row0[p] + B - 1 of x, then rows p·L .. p·L + L - 1 of extra (none when L = 0).
    COL_STEP: write this chunk's column statistics to cpart[p, c] ([P, chunks, 2, K]). ROW_STEP: log u from the
    N_PARTS column partials of cpart[p] (or, with COL_STEP too, from this program's own: one chunk), then the row
    partials of this chunk.
    """
    pid_k = tl.program_id(0)
    chunk = tl.program_id(1)
    problem = tl.program_id(2).to(tl.int64)
    R = B + L
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    x_ptr += tl.load(row0_ptr + problem).to(tl.int64) * stride_xb
    extra_ptr += problem * L * stride_eb
    rstat_ptr += problem * 2 * R
    rpart_ptr += problem * 2 * R * NKB
    cpart_ptr += problem * N_PARTS * 2 * K
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, R)
    own_lo, own_hi = tl.minimum(lo, B), tl.minimum(hi, B)  # this chunk's rows of each source
    extra_lo, extra_hi = tl.maximum(lo, B) - B, tl.maximum(hi, B) - B
    if COL_STEP:
        m = tl.full([BLOCK_K], NEG, tl.float32)
        s = tl.zeros([BLOCK_K], tl.float32)
        m, s = _fold_column_stats(m, s, x_ptr, stride_xb, stride_xk, rstat_ptr, R, own_lo, own_hi, cols, col_mask,
                                  inv_eps, FIRST, BLOCK_B)
        m, s = _fold_column_stats(m, s, extra_ptr, stride_eb, stride_ek, rstat_ptr + B, R, extra_lo, extra_hi,
                                  cols, col_mask, inv_eps, FIRST, BLOCK_B)
        if ROW_STEP:
            log_u = -(m + tl.log(s))
        else:
            tl.store(cpart_ptr + chunk * 2 * K + cols, m, mask=col_mask)
            tl.store(cpart_ptr + chunk * 2 * K + K + cols, s, mask=col_mask)
    else:
        m = tl.full([BLOCK_K], NEG, tl.float32)
        s = tl.zeros([BLOCK_K], tl.float32)
        for part in range(0, N_PARTS):
            part_max = tl.load(cpart_ptr + part * 2 * K + cols, mask=col_mask, other=NEG)
            part_sum = tl.load(cpart_ptr + part * 2 * K + K + cols, mask=col_mask, other=0.0)
            m_new = tl.maximum(m, part_max)
            s = s * tl.exp(m - m_new) + part_sum * tl.exp(part_max - m_new)
            m = m_new
        log_u = -(m + tl.log(tl.where(col_mask, s, 1.0)))
    if ROW_STEP:
        tl.store(log_u_ptr + problem * K + cols, log_u, mask=col_mask & (chunk == 0))
        _write_row_partials(rpart_ptr, R, x_ptr, stride_xb, stride_xk, log_u, own_lo, own_hi, NKB, pid_k, cols,
                            col_mask, inv_eps, BLOCK_B)
        _write_row_partials(rpart_ptr + B * NKB, R, extra_ptr, stride_eb, stride_ek, log_u, extra_lo, extra_hi, NKB,
                            pid_k, cols, col_mask, inv_eps, BLOCK_B)


@triton.jit
def _sinkhorn_row_merge_kernel(rstat_ptr, rpart_ptr, R, NKB, BLOCK_R: tl.constexpr, MERGE: tl.constexpr):
    """rstat[b] = (max_k y[b, k], Σ_k exp(y[b, k] - max)) of rows block program_id(0) of problem program_id(1), merged
    from the NKB column blocks' partials ([P, 2, R, NKB]: maxima, then max-relative sums), MERGE at a time."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    problem = tl.program_id(1).to(tl.int64)
    row_mask = rows < R
    rpart_ptr += problem * 2 * R * NKB
    m = tl.full([BLOCK_R], NEG, tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for j0 in range(0, NKB, MERGE):
        j = j0 + tl.arange(0, MERGE)
        mask = row_mask[:, None] & (j[None, :] < NKB)
        offs = rows[:, None] * NKB + j[None, :]
        part_max = tl.load(rpart_ptr + offs, mask=mask, other=NEG)
        part_sum = tl.load(rpart_ptr + R * NKB + offs, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(part_max, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(part_sum * tl.exp(part_max - m_new[:, None]), axis=1)
        m = m_new
    rstat_ptr += problem * 2 * R
    tl.store(rstat_ptr + rows, m, mask=row_mask)
    tl.store(rstat_ptr + R + rows, s, mask=row_mask)


@triton.jit
def _sinkhorn_codes_kernel(
    codes_ptr, stride_cb,  # output (float32, unit column stride)
    x_ptr, stride_xb, stride_xk, log_u_ptr, rstat_ptr,  # inputs
    B, K, inv_eps,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
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
    row_max, row_sum = row_normalizer(rstat_ptr, rows, row_mask, B)
    y = tl.where(mask, x * inv_eps + log_u[None, :] - row_max[:, None], NEG)
    tl.store(codes_ptr + rows64 * stride_cb + cols[None, :], tl.exp(y) / row_sum[:, None], mask=mask)


MAX_MERGE = 64  # column-block partials merged per step of the row merge (a BLOCK_R × 64 tile)
MIN_CHUNK = 128  # fewest rows a program of the passes sweeps when the rows are split to fill the GPU


def sinkhorn_config(rows: int, k: int, problems: int = 1, sms: int = SM_COUNT, itemsize: int = 4) -> dict:
    """Block sizes and grid of the passes for `problems` problems of `rows` (own + extra) × `k` scores of `itemsize`
    bytes (the one place they are chosen, by arithmetic).

    Column blocks: the widest (32 to 256 columns, at most ~64 blocks per problem) whose strips (rows × BLOCK_K) for
    two programs per SM fit in half the L2, so that a program's second sweep of its strip (the row step) is served
    by L2 and HBM sees the scores once per iteration: at SEER's K = 16,000 with 528 rows per problem that is 32
    columns (1,000 programs for 2 problems); K = 65,536: 256 to 2,048 blocks. Row chunks: one, unless the column
    blocks of all problems leave the SMs without two programs each and there are rows to spare (MIN_CHUNK at least
    per program); then about two programs per SM, each chunk swept twice (column and row passes apart).
    """
    fitting = L2_BYTES // 2 // (2 * sms * rows * itemsize)
    block_k = max(32, min(256, 1 << (max(fitting, 1).bit_length() - 1), pow2(triton.cdiv(k, 64), 32, 256)))
    nkb = triton.cdiv(k, block_k)
    chunks = max(1, min(triton.cdiv(2 * sms, nkb * problems), rows // MIN_CHUNK))
    block_b = pow2(triton.cdiv(rows, chunks), 16, max(16, MAX_TILE // block_k))
    chunk = triton.cdiv(triton.cdiv(rows, chunks), block_b) * block_b
    merge = pow2(nkb, min(16, MAX_MERGE), MAX_MERGE)
    chunks = triton.cdiv(rows, chunk)
    strips_in_l2 = chunks == 1 and 2 * sms * rows * block_k * itemsize <= L2_BYTES // 2
    return dict(BLOCK_B=block_b, BLOCK_K=block_k, nkb=nkb, chunk=chunk, chunks=chunks, strips_in_l2=strips_in_l2,
                MERGE=merge, BLOCK_R=pow2(rows, 16, max(16, MAX_TILE // merge)), num_warps=num_warps(block_b * block_k))


@torch.compiler.disable
def sinkhorn_potentials(x: torch.Tensor, row0: torch.Tensor, rows: int, *, epsilon: float, iterations: int,
                        group, extra_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run Sinkhorn on len(row0) problems: rows row0[p] .. row0[p] + rows - 1 of x (any float dtype, 2-D).

    extra_rows: None, or a (P·L) × K score matrix (any float dtype and strides) whose rows p·L .. p·L + L - 1
    join problem p: they count in its prototype sums (over every rank of `group`), but no codes are returned for
    them. row0: int32 tensor on x's device. Returns (log u: P × K fp32, rstat: P × 2 × (rows + L) fp32
    row maxima and max-relative sums of y = x / epsilon + log u, the problems' own rows first, config);
    codes[b] = exp(y[b] - rstat[p, 0, b]) / rstat[p, 1, b].
    """
    problems, k = row0.numel(), x.shape[1]
    extra_len = 0 if extra_rows is None else extra_rows.shape[0] // problems
    if extra_rows is not None and extra_rows.shape != (problems * extra_len, k):
        raise ValueError(f"sinkhorn_potentials: extra_rows must be (P·L) × K = ({problems}·L) × {k}, "
                         f"got shape {tuple(extra_rows.shape)}")
    total = rows + extra_len
    cfg = sinkhorn_config(total, k, problems, sm_count(x.device), x.element_size())
    nkb, chunks = cfg["nkb"], cfg["chunks"]
    f32 = dict(device=x.device, dtype=torch.float32)
    log_u = torch.empty(problems, k, **f32)
    rstat = torch.empty(problems, 2, total, **f32)
    rpart = torch.empty(problems, 2, total, nkb, **f32)
    cpart = torch.empty(problems, chunks, 2, k, **f32)  # column statistics of each row chunk
    extra = x if extra_rows is None else extra_rows  # placeholder when L = 0: no program sweeps extra rows
    grid = (nkb, chunks, problems)
    meta = dict(BLOCK_B=cfg["BLOCK_B"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    merge_meta = dict(BLOCK_R=cfg["BLOCK_R"], MERGE=cfg["MERGE"], num_warps=num_warps(cfg["BLOCK_R"] * cfg["MERGE"]))
    inv_eps = 1.0 / epsilon

    def rows_pass(parts, first, col_step, row_step):
        _sinkhorn_pass_kernel[grid](log_u, rpart, parts, x, x.stride(0), x.stride(1), row0, extra, extra.stride(0),
                                    extra.stride(1), rstat, rows, extra_len, k, nkb, cfg["chunk"], parts.shape[1],
                                    inv_eps, FIRST=first, COL_STEP=col_step, ROW_STEP=row_step, **meta)

    for it in range(iterations):
        if chunks == 1 and group is None:
            rows_pass(cpart, it == 0, True, True)
        else:
            rows_pass(cpart, it == 0, True, False)
            rows_pass(cpart if group is None else _merged_column_stats(cpart, group), it == 0, False, True)
        _sinkhorn_row_merge_kernel[(triton.cdiv(total, cfg["BLOCK_R"]), problems)](rstat, rpart, total, nkb,
                                                                                  **merge_meta)
    return log_u, rstat, cfg


def _merged_column_stats(cpart: torch.Tensor, group) -> torch.Tensor:
    """The chunks' column statistics [P, chunks, 2, K] merged here and all-reduced over `group`: [P, 1, 2, K]."""
    col_max, col_sum = cpart[:, :, 0], cpart[:, :, 1]
    global_max = col_max.amax(dim=1)  # a new tensor: all-reduced in place
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    total = (col_sum * torch.exp(col_max - global_max[:, None])).sum(dim=1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return torch.stack((global_max, total), dim=1)[:, None]


@torch.compiler.disable
def sinkhorn_forward(scores: torch.Tensor, *, epsilon: float, iterations: int, group) -> torch.Tensor:
    """Codes of a B × K score matrix (float16/bfloat16/float32, any strides) as a contiguous float32 B × K."""
    b, k = scores.shape
    row0 = torch.zeros(1, dtype=torch.int32, device=scores.device)
    log_u, rstat, cfg = sinkhorn_potentials(scores, row0, b, epsilon=epsilon, iterations=iterations, group=group)
    codes = torch.empty(b, k, device=scores.device, dtype=torch.float32)
    block_b = pow2(b, 16, max(16, MAX_TILE // cfg["BLOCK_K"]))
    _sinkhorn_codes_kernel[(cfg["nkb"], triton.cdiv(b, block_b))](
        codes, codes.stride(0), scores, scores.stride(0), scores.stride(1), log_u, rstat, b, k, 1.0 / epsilon,
        BLOCK_B=block_b, BLOCK_K=cfg["BLOCK_K"], num_warps=num_warps(block_b * cfg["BLOCK_K"]))
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

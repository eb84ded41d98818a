"""Triton kernels for L_spec and L_orth and their gradient w.r.t. Z, never forming d x d when N < d.

With m = min(N, d), the only quadratic buffers are two m x m Gram matrices (of Z and of the standardized Zs):
the N x N Grams Z Z^T when N < d, the d x d moments Z^T Z when N >= d. The same kernels serve both cases by
passing transposed strides.

Forward (3 launches):
  1. `_col_stats_kernel`    per column block: mean, 1/sqrt(var + eps) (two passes over rows), writes Zs, and
                            partial sums of ||Z||^2 and tr(C) = sum_j var_j / (var_j + eps).
  2. `_dual_gram_kernel`    one upper-triangle tile of P = X X^T and Ps = Xs Xs^T (X = Z or Z^T; symmetric, so
                            half a GEMM's FLOPs), plus per-tile partial sums of P^2 and Ps^2 ->
                            ||Z^T Z||_F^2 and ||Zs^T Zs||_F^2 without another read.
  3. torch: a handful of scalar sums and the loss formulas of `reference`.
Backward (2 launches), with upstream scalars g_spec, g_orth folded into four coefficients:
  4. `_dual_matmul_kernel`  dZ_spec = c1 P Z - c2 Z and G = a Ps Zs - b Zs (or Z P, Zs Ps when N >= d);
                            writes dZ_spec and G and per-row-block partial column sums of G and G * Zs.
  5. `_orth_finish_kernel`  dZ = dZ_spec + (G - mean(G) - Zs mean(G Zs)) * rstd (standardization backward).

Partial sums go to per-program buffers reduced in a fixed order (deterministic; no atomics). Accumulation
is fp32; dots are tf32x3 on a GPU (:func:`dot_precision`) and IEEE fp32 under the interpreter, except the Gram
of a bf16/fp16 Z, whose products are exact in fp32 and run as one half-precision tensor-core pass. On a GPU the
two dot kernels are autotuned among spill-free candidates (GRAM_TILES, MATMUL_TILES); the interpreter uses
32 x 32 tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tuning import HALF_DTYPES, autotuner, operand_dtype, operand_kind
from .reference import DEFAULT_EPS

BLOCK = 32  # tl.dot needs >= 16 per dimension; 32 keeps the interpreter fast and registers modest
# GPU autotuning candidates of the two dot kernels per operand kind, all spill-free on sm_80 and sm_90 in the cubin
# Triton itself builds (its ptxas flags; python -m ehrfm.kernels.aot, tests/kernels/test_triton_aot.py). tf32x3
# splits every fp32 operand into two tf32 halves: 64- and 128-row tiles spilled 0.5-1.7 KB, so the resident tiles
# stay 32 rows. On sm_90 the fp32 Gram spills 24-40 bytes once pipelined (2-3 stages), and every matmul tile but
# 32 x 64 with 8 warps spills 12-716 bytes (32 x 32 and 32 x 128 tiles, 4 warps). The row tile is fixed so the
# per-program partial-sum buffers keep one layout whatever the tuner picks.
GRAM_TILES: dict[str, list[tuple[int, int]]] = {  # _dual_gram_kernel: (num_warps, num_stages), 32 x 32 tiles
    "fp32": [(8, 1), (4, 1)],
    "half": [(8, 2), (8, 3)],
}
MATMUL_TILES: dict[str, list[tuple[int, int, int]]] = {  # _dual_matmul_kernel: (BLOCK_D, num_warps, num_stages)
    "fp32": [(64, 8, 2), (64, 8, 3)],
    "half": [(64, 8, 2), (64, 8, 3)],
}


@triton.jit
def _col_stats_kernel(
    Z,
    ZS,
    MEAN,
    RSTD,
    PART,
    N,
    D,
    stride_zn,
    stride_zd,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        x = tl.load(Z + rows[:, None] * stride_zn + cols[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
        total += tl.sum(x, axis=0)
        sumsq += tl.sum(x * x, axis=0)
    mean = total / N
    centred = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        x = tl.load(Z + rows[:, None] * stride_zn + cols[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
        xc = tl.where(m, x - mean[None, :], 0.0)
        centred += tl.sum(xc * xc, axis=0)
    var = centred / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + cols, mean, mask=cmask)
    tl.store(RSTD + cols, rstd, mask=cmask)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        m = (rows[:, None] < N) & cmask[None, :]
        x = tl.load(Z + rows[:, None] * stride_zn + cols[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
        tl.store(ZS + rows[:, None] * D + cols[None, :], (x - mean[None, :]) * rstd[None, :], mask=m)
    tl.store(PART + pid * 2, tl.sum(sumsq, axis=0))
    tl.store(PART + pid * 2 + 1, tl.sum(tl.where(cmask, var * rstd * rstd, 0.0), axis=0))


@triton.jit
def _dual_gram_kernel(
    A,
    B,
    PA,
    PB,
    PART,
    M,
    R,
    stride_am,
    stride_ar,
    stride_bm,
    stride_br,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
    HALF_GRAM: tl.constexpr,
):
    """P[i, j] = sum_r A[i, r] A[j, r] and the same for B, A and B (M, R), one (BLOCK_M, BLOCK_M) tile.

    P is symmetric: only tiles with j >= i compute (half the FLOPs of a GEMM); each writes itself and its
    mirror, and off-diagonal tiles count twice in the squared sums. Skipped programs leave PART at 0.
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j < pid_i:
        return
    ri = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    acc_a = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        rr = start + tl.arange(0, BLOCK_R)
        m_i = (ri[:, None] < M) & (rr[None, :] < R)
        m_j = (rr[:, None] < R) & (rj[None, :] < M)
        a_i = tl.load(A + ri[:, None] * stride_am + rr[None, :] * stride_ar, mask=m_i, other=0.0)
        a_j = tl.load(A + rr[:, None] * stride_ar + rj[None, :] * stride_am, mask=m_j, other=0.0)
        if HALF_GRAM:  # bf16/fp16 Z: products are exact in fp32, one tensor-core pass instead of tf32x3's three
            acc_a = tl.dot(a_i, a_j, acc_a)
        else:
            acc_a = tl.dot(a_i.to(tl.float32), a_j.to(tl.float32), acc_a, input_precision=PREC)
        b_i = tl.load(B + ri[:, None] * stride_bm + rr[None, :] * stride_br, mask=m_i, other=0.0)
        b_j = tl.load(B + rr[:, None] * stride_br + rj[None, :] * stride_bm, mask=m_j, other=0.0)
        acc_b = tl.dot(b_i, b_j, acc_b, input_precision=PREC)
    out_mask = (ri[:, None] < M) & (rj[None, :] < M)
    tl.store(PA + ri[:, None] * M + rj[None, :], acc_a, mask=out_mask)
    tl.store(PB + ri[:, None] * M + rj[None, :], acc_b, mask=out_mask)
    tl.store(PA + rj[None, :] * M + ri[:, None], acc_a, mask=out_mask)
    tl.store(PB + rj[None, :] * M + ri[:, None], acc_b, mask=out_mask)
    weight = tl.where(pid_i == pid_j, 1.0, 2.0)
    tile = pid_i * tl.num_programs(1) + pid_j
    # Out-of-range entries are 0 (masked loads), so the squared sums need no extra mask.
    tl.store(PART + tile * 2, weight * tl.sum(tl.sum(acc_a * acc_a, axis=1), axis=0))
    tl.store(PART + tile * 2 + 1, weight * tl.sum(tl.sum(acc_b * acc_b, axis=1), axis=0))


@triton.jit
def _dual_matmul_kernel(
    L1,
    R1,
    L2,
    R2,
    Z,
    ZS,
    COEF,
    DZ,
    G,
    COLPART,
    N,
    D,
    K,
    s_l1n,
    s_l1k,
    s_r1k,
    s_r1d,
    s_l2n,
    s_l2k,
    s_r2k,
    s_r2d,
    stride_zn,
    stride_zd,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_D) tile of dZ_spec = c1 L1 R1 - c2 Z and G = a L2 R2 - b Zs (all (N, d))."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    acc1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        kk = start + tl.arange(0, BLOCK_K)
        m_l = (rows[:, None] < N) & (kk[None, :] < K)
        m_r = (kk[:, None] < K) & (cols[None, :] < D)
        l1 = tl.load(L1 + rows[:, None] * s_l1n + kk[None, :] * s_l1k, mask=m_l, other=0.0).to(tl.float32)
        r1 = tl.load(R1 + kk[:, None] * s_r1k + cols[None, :] * s_r1d, mask=m_r, other=0.0).to(tl.float32)
        acc1 = tl.dot(l1, r1, acc1, input_precision=PREC)
        l2 = tl.load(L2 + rows[:, None] * s_l2n + kk[None, :] * s_l2k, mask=m_l, other=0.0)
        r2 = tl.load(R2 + kk[:, None] * s_r2k + cols[None, :] * s_r2d, mask=m_r, other=0.0)
        acc2 = tl.dot(l2, r2, acc2, input_precision=PREC)
    c1 = tl.load(COEF)
    c2 = tl.load(COEF + 1)
    a = tl.load(COEF + 2)
    b = tl.load(COEF + 3)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    z = tl.load(Z + rows[:, None] * stride_zn + cols[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
    zs = tl.load(ZS + rows[:, None] * D + cols[None, :], mask=m, other=0.0)
    g = tl.where(m, a * acc2 - b * zs, 0.0)
    offs = rows[:, None] * D + cols[None, :]
    tl.store(DZ + offs, c1 * acc1 - c2 * z, mask=m)
    tl.store(G + offs, g, mask=m)
    cmask = cols < D
    tl.store(COLPART + (pid_n * 2) * D + cols, tl.sum(g, axis=0), mask=cmask)
    tl.store(COLPART + (pid_n * 2 + 1) * D + cols, tl.sum(g * zs, axis=0), mask=cmask)


@triton.jit
def _orth_finish_kernel(
    DZ,
    G,
    ZS,
    RSTD,
    COLSUM,
    N,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dZ += (G - colmean(G) - Zs * colmean(G * Zs)) * rstd; COLSUM (2, D) holds the column sums of G and
    G * Zs (reduced once in PyTorch from the per-row-block partials, so each program reads 2 D values)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    sum_g = tl.load(COLSUM + cols, mask=cmask, other=0.0)
    sum_gz = tl.load(COLSUM + D + cols, mask=cmask, other=0.0)
    m = (rows[:, None] < N) & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    g = tl.load(G + offs, mask=m, other=0.0)
    zs = tl.load(ZS + offs, mask=m, other=0.0)
    rstd = tl.load(RSTD + cols, mask=cmask, other=0.0)
    dz = tl.load(DZ + offs, mask=m, other=0.0)
    dz += (g - sum_g[None, :] / N - zs * (sum_gz[None, :] / N)) * rstd[None, :]
    tl.store(DZ + offs, dz, mask=m)


def dot_precision(device: torch.device) -> str:
    """Gram / matmul dot precision: "tf32x3" on GPU (three tf32 tensor-core products, fp32-level accuracy;
    IEEE fp32 dots lower to FMA chains), IEEE fp32 under the interpreter. Plain tf32 is not used: the spectral
    loss is a small difference of large moments (q / s^2 - 1/d) that tf32's 10-bit mantissa would swamp."""
    return "tf32x3" if device.type == "cuda" else "ieee"


def _half_gram(z: torch.Tensor) -> bool:
    """Whether the Gram of z runs on half operands (:func:`ehrfm.kernels.tuning.operand_dtype`: bf16/fp16 on a
    GPU, fp16 under the interpreter too, so the CPU tests cover the half path)."""
    return operand_dtype(z.dtype, z.is_cuda) in HALF_DTYPES


def _gram_launcher(on_gpu: bool, grid: tuple[int, int]):
    """(kernel launcher, constexprs the caller adds): the autotuner on a GPU, fixed 32 x 32 tiles on CPU."""
    if not on_gpu:
        return _dual_gram_kernel[grid], {"BLOCK_R": BLOCK, "num_warps": 4}
    every = sorted({t for tiles in GRAM_TILES.values() for t in tiles})
    configs = [triton.Config({"BLOCK_R": BLOCK}, num_warps=w, num_stages=st) for w, st in every]

    def prune(configs, named_args, **kwargs):
        keep = GRAM_TILES[operand_kind(named_args["A"].dtype)]
        return [c for c in configs if (c.num_warps, c.num_stages) in keep]

    tuner = autotuner("dense:gram", _dual_gram_kernel, configs, key=["PREC", "HALF_GRAM"], prune=prune)
    return tuner[grid], {}


def _matmul_launcher(on_gpu: bool, dtype: torch.dtype, d: int, n_row_blocks: int):
    """As :func:`_gram_launcher`; the grid's column count follows the tuned BLOCK_D."""
    if not on_gpu:
        return _dual_matmul_kernel[(n_row_blocks, triton.cdiv(d, BLOCK))], {"BLOCK_D": BLOCK, "num_warps": 4}
    every = sorted({t for tiles in MATMUL_TILES.values() for t in tiles})
    configs = [triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=st) for bd, w, st in every]

    def prune(configs, named_args, **kwargs):
        keep = MATMUL_TILES[operand_kind(named_args["Z"].dtype)]
        return [c for c in configs if (c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) in keep]

    tuner = autotuner("dense:matmul", _dual_matmul_kernel, configs, key=["PREC"], prune=prune)
    return tuner[lambda meta: (n_row_blocks, triton.cdiv(d, meta["BLOCK_D"]))], {}


class _SpecOrthFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, eps: float):
        n, d = z.shape
        dev = z.device
        zs = torch.empty(n, d, dtype=torch.float32, device=dev)
        mean = torch.empty(d, dtype=torch.float32, device=dev)
        rstd = torch.empty(d, dtype=torch.float32, device=dev)
        n_col_blocks = triton.cdiv(d, BLOCK)
        part = torch.empty(n_col_blocks, 2, dtype=torch.float32, device=dev)
        _col_stats_kernel[(n_col_blocks,)](
            z, zs, mean, rstd, part, n, d, z.stride(0), z.stride(1), eps, BLOCK_N=BLOCK, BLOCK_D=BLOCK
        )
        s, trace_c = part.sum(dim=0).unbind()
        if n < d:  # X = Z (N, d): N x N Grams
            m, r = n, d
            strides = (z.stride(0), z.stride(1), zs.stride(0), zs.stride(1))
        else:  # X = Z^T (d, N): d x d moments
            m, r = d, n
            strides = (z.stride(1), z.stride(0), zs.stride(1), zs.stride(0))
        p = torch.empty(m, m, dtype=torch.float32, device=dev)
        ps = torch.empty(m, m, dtype=torch.float32, device=dev)
        grid = (triton.cdiv(m, BLOCK), triton.cdiv(m, BLOCK))
        part2 = torch.zeros(grid[0] * grid[1], 2, dtype=torch.float32, device=dev)
        launch, fixed = _gram_launcher(z.is_cuda, grid)
        launch(
            z,
            zs,
            p,
            ps,
            part2,
            m,
            r,
            *strides,
            BLOCK_M=BLOCK,
            PREC=dot_precision(z.device),
            HALF_GRAM=_half_gram(z),
            **fixed,
        )
        q, qs = part2.sum(dim=0).unbind()
        spec = q / s.square() - 1.0 / d
        orth = qs / n**2 - 2 * trace_c + d
        ctx.save_for_backward(z, zs, rstd, p, ps, s, q)
        return spec, orth

    @staticmethod
    def backward(ctx, g_spec: torch.Tensor, g_orth: torch.Tensor):
        z, zs, rstd, p, ps, s, q = ctx.saved_tensors
        n, d = z.shape
        coef = torch.stack([4 * g_spec / s.square(), 4 * g_spec * q / s**3, 4 * g_orth / n**2, 4 * g_orth / n])
        coef = coef.to(torch.float32).contiguous()
        dz = torch.empty(n, d, dtype=torch.float32, device=z.device)
        g = torch.empty_like(dz)
        grid = (triton.cdiv(n, BLOCK), triton.cdiv(d, BLOCK))
        colpart = torch.empty(grid[0], 2, d, dtype=torch.float32, device=z.device)  # every (row block, column)
        if n < d:  # dZ = P Z, G = Ps Zs with P (N, N)
            operands = (p, z, ps, zs)
            k_dim = n
        else:  # dZ = Z P, G = Zs Ps with P (d, d)
            operands = (z, p, zs, ps)
            k_dim = d
        strides = [st for t in operands for st in t.stride()]
        launch, fixed = _matmul_launcher(z.is_cuda, z.dtype, d, grid[0])
        launch(
            *operands,
            z,
            zs,
            coef,
            dz,
            g,
            colpart,
            n,
            d,
            k_dim,
            *strides,
            z.stride(0),
            z.stride(1),
            BLOCK_N=BLOCK,
            BLOCK_K=BLOCK,
            PREC=dot_precision(z.device),
            **fixed,
        )
        colsum = colpart.sum(dim=0).contiguous()  # (2, d): one reduction instead of one per program
        _orth_finish_kernel[grid](dz, g, zs, rstd, colsum, n, d, BLOCK_N=BLOCK, BLOCK_D=BLOCK)
        return dz.to(z.dtype), None


def spec_orth_triton(z: torch.Tensor, eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_spec, L_orth) of z (N, d) as fp32 scalars with a Triton backward; z may be fp32/bf16/fp16."""
    if z.dim() != 2:
        raise ValueError(f"expected (N, d) embeddings, got shape {tuple(z.shape)}")
    if z.dtype == torch.float64:  # the kernels accumulate in fp32
        z = z.float()
    return _SpecOrthFunction.apply(z, eps)

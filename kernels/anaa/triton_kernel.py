"""Fused ANAA attention in Triton: flash-attention tiles, online S2, in-kernel Philox noise (forward + backward).

The kernels compute, per (batch, head) and tile of query rows, with V' = G_k^T V already convolved (O(n d)):

    Y_A = softmax(S) V'         (online softmax over key tiles; S = q k^T / sqrt(d), masked)   _anaa_fwd
    r_i = sum_j A_ij^2          (online: s2 <- s2 * alpha^2 + sum p^2, divided by l^2 at the end)
    lse_i                       (for the backward pass)
    Y_Z = (Z . M) V'            (a kernel of its own: the noise never enters the softmax loop) _anaa_noise_fwd

and PyTorch finishes the O(n d) epilogue: per-document mu = 1/L and sigma from r (eq. 6-7),
``Y = Y_A + mu * (M V') + sigma * Y_Z`` and ``O = G_q Y``. Masks: padding and packed documents via a
(batch, seq) int32 document-id vector (0 = pad), causal via the tile index. Each tile visits only the key (or
query) tiles its documents span (:func:`.masks.document_bounds`), so packed rows cost sum(L_doc^2), not n^2.

Noise: element (i, j) of head (b, h) is one of the four normals of a Philox-4x32 block keyed by the seed at
counter (j // 4, i, b * H + h, 0) (Box-Muller on its four words), regenerated tile by tile in backward for
dV' += Z^T dY_Z (``_anaa_noise_bwd_dv``) -- no n x n tensor is ever stored. Debug mode (``noise`` given) loads
the materialised Z instead, so outputs and gradients can be compared exactly with the reference;
:func:`philox_noise` materialises the Philox Z the kernels use, for tests.

Backward (three kernels, no atomics): dS_ij = P_ij (dP_ij - Delta_i + 2 dr_i (P_ij - r_i)), with
dP = dY_A V'^T, Delta_i = dY_A_i . Y_A_i, and dr the gradient reaching r through sigma (0 when detached).

Precision: bf16/fp16 inputs are read as bf16/fp16 operands (q, k, V', dY, and P / dS / Z cast down before
their dots, as flash-attention does); every sum and accumulator is fp32. fp32 inputs use tf32 tensor-core dots on
a GPU and IEEE fp32 under the interpreter (:func:`dot_precision`). Tiles: autotuned on a GPU among candidates
that compile without register spills (:mod:`.tiles`); 16 x 16 under ``TRITON_INTERPRET=1`` (CPU tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..tuning import autotuner, operand_dtype
from . import tiles
from .factorized import noise_statistics
from .gaussian import conv_rows
from .masks import document_bounds, run_starts_index, segment_cumsum, segment_sum

NOISE_OFF, NOISE_PHILOX, NOISE_EXPLICIT = 0, 1, 2
NEG: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL: tl.constexpr):
    ok = (doc_q[:, None] == doc_k[None, :]) & (doc_q[:, None] != 0)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return ok


@triton.jit
def _noise_tile(Z, seed, bh, offs_m, start_n, n, ok, NOISE: tl.constexpr, BN: tl.constexpr):
    """The (BM, BN) noise tile of keys start_n..start_n+BN: loaded (explicit Z) or drawn (Philox-4x32, four
    normals per call: element (i, j) of head bh is component j % 4 of the Philox block keyed by ``seed`` at
    counter (j // 4, i, bh, 0); 32-bit counters, no 64-bit index arithmetic; start_n is a multiple of 4)."""
    if NOISE == 2:
        offs_n = start_n + tl.arange(0, BN)
        ptr = Z + bh.to(tl.int64) * n * n + offs_m[:, None].to(tl.int64) * n + offs_n[None, :]
        z = tl.load(ptr, mask=ok, other=0.0)
    else:
        BM: tl.constexpr = offs_m.shape[0]
        quad = tl.broadcast_to((start_n // 4 + tl.arange(0, BN // 4))[None, :], (BM, BN // 4)).to(tl.uint32)
        row = tl.broadcast_to(offs_m[:, None], (BM, BN // 4)).to(tl.uint32)
        head = tl.full((BM, BN // 4), 0, tl.uint32) + bh.to(tl.uint32)
        c0, c1, c2, c3 = tl.philox(seed, quad, row, head, quad * 0)
        z0, z1 = tl.random.pair_uniform_to_normal(
            tl.random.uint_to_uniform_float(c0), tl.random.uint_to_uniform_float(c1)
        )
        z2, z3 = tl.random.pair_uniform_to_normal(
            tl.random.uint_to_uniform_float(c2), tl.random.uint_to_uniform_float(c3)
        )
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (BM, BN))
    return tl.where(ok, z, 0.0)


@triton.jit
def _key_range(DSTART, DEND, b, n, offs, ok, BLOCK: tl.constexpr):
    """[lo, hi) covering every position the documents of ``offs`` span; lo aligned down to BLOCK. Tiles
    outside it hold no position of these documents: skipped (an all-padding tile gives an empty range)."""
    start = tl.where(ok, tl.load(DSTART + b * n + offs, mask=ok, other=0), n)
    end = tl.where(ok, tl.load(DEND + b * n + offs, mask=ok, other=0), 0)
    return (tl.min(start, 0) // BLOCK) * BLOCK, tl.max(end, 0)


@triton.jit
def _load_rows(PTR, base, offs, ok, offs_d, d):
    """The (len(offs), BD) tile of rows ``offs`` of a (n, d) matrix at ``PTR + base``; 0 outside."""
    return tl.load(
        PTR + base + offs[:, None] * d + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < d), other=0.0
    )


@triton.jit
def _program_tile(n, H, d, BLOCK: tl.constexpr, BD: tl.constexpr):
    """This program's (tile index, b * H + h, b, row offsets of its resident tile, column offsets, offset of
    head (b, h) in a (B, H, n, d) tensor, rows in range)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return pid, bh, bh // H, offs, tl.arange(0, BD), bh.to(tl.int64) * n * d, offs < n


@triton.jit
def _store_rows(PTR, base, offs, ok, offs_d, d, value):
    tl.store(PTR + base + offs[:, None] * d + offs_d[None, :], value, mask=ok[:, None] & (offs_d[None, :] < d))


@triton.jit
def _anaa_fwd(
    Q,
    K,
    V,
    DOC,
    DSTART,
    DEND,
    YA,
    R,
    LSE,
    n,
    H,
    d,
    scale,
    CAUSAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Y_A, r and lse for BM query rows: online softmax over the key tiles their documents span."""
    pid_m, bh, b, offs_m, offs_d, base, row_ok = _program_tile(n, H, d, BM, BD)
    q = _load_rows(Q, base, offs_m, row_ok, offs_d, d)
    doc_q = tl.load(DOC + b * n + offs_m, mask=row_ok, other=0)
    m_i = tl.full((BM,), NEG, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    s2 = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    lo, hi = _key_range(DSTART, DEND, b, n, offs_m, row_ok, BN)
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BM)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        col_ok = offs_n < n
        k = _load_rows(K, base, offs_n, col_ok, offs_d, d)
        v = _load_rows(V, base, offs_n, col_ok, offs_d, d)
        doc_k = tl.load(DOC + b * n + offs_n, mask=col_ok, other=-1)
        ok = _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL)
        s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        s2 = s2 * alpha * alpha + tl.sum(p * p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    _store_rows(YA, base, offs_m, row_ok, offs_d, d, acc / l_safe[:, None])
    tl.store(R + bh * n + offs_m, s2 / (l_safe * l_safe), mask=row_ok)
    tl.store(LSE + bh * n + offs_m, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _anaa_noise_fwd(
    V,
    DOC,
    DSTART,
    DEND,
    Z,
    YZ,
    seed,
    n,
    H,
    d,
    CAUSAL: tl.constexpr,
    NOISE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """Y_Z = (Z . M) V' for BM query rows. A kernel of its own: Philox and Box-Muller beside the softmax
    loop's two accumulators spilled registers at 64-row tiles (``python -m ehrfm.kernels.aot``)."""
    pid_m, bh, b, offs_m, offs_d, base, row_ok = _program_tile(n, H, d, BM, BD)
    doc_q = tl.load(DOC + b * n + offs_m, mask=row_ok, other=0)
    acc = tl.zeros((BM, BD), tl.float32)
    lo, hi = _key_range(DSTART, DEND, b, n, offs_m, row_ok, BN)
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BM)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        col_ok = offs_n < n
        v = _load_rows(V, base, offs_n, col_ok, offs_d, d)
        doc_k = tl.load(DOC + b * n + offs_n, mask=col_ok, other=-1)
        ok = _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL)
        z = _noise_tile(Z, seed, bh, offs_m, start_n, n, ok, NOISE, BN)
        acc += tl.dot(z.to(v.dtype), v, input_precision=PREC)
    _store_rows(YZ, base, offs_m, row_ok, offs_d, d, acc)


@triton.jit
def _row_stats(LSE, DELTA, DR, R, bh, n, offs, ok):
    """Per query row of head ``bh``: lse, Delta = dY_A . Y_A, dr and r (0 outside)."""
    at = bh * n + offs
    return (
        tl.load(LSE + at, mask=ok, other=0.0),
        tl.load(DELTA + at, mask=ok, other=0.0),
        tl.load(DR + at, mask=ok, other=0.0),
        tl.load(R + at, mask=ok, other=0.0),
    )


@triton.jit
def _probs_and_score_grads(q, k, v, dya, ok, lse, delta, dr, r, scale, PREC: tl.constexpr):
    """One tile's softmax P (recomputed from lse) and dS = P (dP - Delta + 2 dr (P - r)), dP = dY_A V'^T: the
    backward formula both backward kernels use."""
    s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, NEG)
    p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(dya, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None] + 2.0 * dr[:, None] * (p - r[:, None]))


@triton.jit
def _anaa_bwd_dkdv(
    Q,
    K,
    V,
    DOC,
    DSTART,
    DEND,
    DYA,
    LSE,
    DELTA,
    DR,
    R,
    DK,
    DV,
    n,
    H,
    d,
    scale,
    CAUSAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """dK and the softmax part of dV' for BN key rows, looping over the query tiles that can see them."""
    pid_n, bh, b, offs_n, offs_d, base, col_ok = _program_tile(n, H, d, BN, BD)
    k = _load_rows(K, base, offs_n, col_ok, offs_d, d)
    v = _load_rows(V, base, offs_n, col_ok, offs_d, d)
    doc_k = tl.load(DOC + b * n + offs_n, mask=col_ok, other=-1)
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    lo, hi = _key_range(DSTART, DEND, b, n, offs_n, col_ok, BM)  # the queries that can see this key tile
    if CAUSAL:
        lo = tl.maximum(lo, (pid_n * BN // BM) * BM)
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        row_ok = offs_m < n
        q = _load_rows(Q, base, offs_m, row_ok, offs_d, d)
        dya = _load_rows(DYA, base, offs_m, row_ok, offs_d, d)
        doc_q = tl.load(DOC + b * n + offs_m, mask=row_ok, other=0)
        lse, delta, dr, r = _row_stats(LSE, DELTA, DR, R, bh, n, offs_m, row_ok)
        ok = _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL)
        p, ds = _probs_and_score_grads(q, k, v, dya, ok, lse, delta, dr, r, scale, PREC)
        dv += tl.dot(tl.trans(p.to(dya.dtype)), dya, input_precision=PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
    _store_rows(DK, base, offs_n, col_ok, offs_d, d, dk)
    _store_rows(DV, base, offs_n, col_ok, offs_d, d, dv)


@triton.jit
def _anaa_noise_bwd_dv(
    DOC,
    DSTART,
    DEND,
    Z,
    DYZ,
    DVZ,
    seed,
    n,
    H,
    d,
    CAUSAL: tl.constexpr,
    NOISE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """The noise part of dV' = Z^T dY_Z for BN key rows, Z regenerated tile by tile (never stored)."""
    pid_n, bh, b, offs_n, offs_d, base, col_ok = _program_tile(n, H, d, BN, BD)
    doc_k = tl.load(DOC + b * n + offs_n, mask=col_ok, other=-1)
    dv = tl.zeros((BN, BD), tl.float32)
    lo, hi = _key_range(DSTART, DEND, b, n, offs_n, col_ok, BM)  # the queries that can see this key tile
    if CAUSAL:
        lo = tl.maximum(lo, (pid_n * BN // BM) * BM)
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        row_ok = offs_m < n
        dyz = _load_rows(DYZ, base, offs_m, row_ok, offs_d, d)
        doc_q = tl.load(DOC + b * n + offs_m, mask=row_ok, other=0)
        ok = _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL)
        z = _noise_tile(Z, seed, bh, offs_m, pid_n * BN, n, ok, NOISE, BN)
        dv += tl.dot(tl.trans(z.to(dyz.dtype)), dyz, input_precision=PREC)
    _store_rows(DVZ, base, offs_n, col_ok, offs_d, d, dv)


@triton.jit
def _anaa_bwd_dq(
    Q,
    K,
    V,
    DOC,
    DSTART,
    DEND,
    DYA,
    LSE,
    DELTA,
    DR,
    R,
    DQ,
    n,
    H,
    d,
    scale,
    CAUSAL: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """dQ for BM query rows."""
    pid_m, bh, b, offs_m, offs_d, base, row_ok = _program_tile(n, H, d, BM, BD)
    q = _load_rows(Q, base, offs_m, row_ok, offs_d, d)
    dya = _load_rows(DYA, base, offs_m, row_ok, offs_d, d)
    doc_q = tl.load(DOC + b * n + offs_m, mask=row_ok, other=0)
    lse, delta, dr, r = _row_stats(LSE, DELTA, DR, R, bh, n, offs_m, row_ok)
    dq = tl.zeros((BM, BD), tl.float32)
    lo, hi = _key_range(DSTART, DEND, b, n, offs_m, row_ok, BN)
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BM)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        col_ok = offs_n < n
        k = _load_rows(K, base, offs_n, col_ok, offs_d, d)
        v = _load_rows(V, base, offs_n, col_ok, offs_d, d)
        doc_k = tl.load(DOC + b * n + offs_n, mask=col_ok, other=-1)
        ok = _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL)
        _, ds = _probs_and_score_grads(q, k, v, dya, ok, lse, delta, dr, r, scale, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
    _store_rows(DQ, base, offs_m, row_ok, offs_d, d, dq)


@triton.jit
def _philox_noise_kernel(Z, seed, n, BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    ok = (offs_m[:, None] < n) & (offs_n[None, :] < n)
    z = _noise_tile(Z, seed, bh, offs_m, pid_n * BN, n, ok, 1, BN)
    tl.store(Z + bh.to(tl.int64) * n * n + offs_m[:, None] * n + offs_n[None, :], z, mask=ok)


def philox_noise(seed: int, batch: int, heads: int, n: int, device="cpu") -> torch.Tensor:
    """The standard-normal Z (batch, heads, n, n) the fused kernel draws for ``seed`` (float32)."""
    z = torch.empty(batch, heads, n, n, dtype=torch.float32, device=device)
    _philox_noise_kernel[(triton.cdiv(n, 16), triton.cdiv(n, 16), batch * heads)](z, seed, n, BM=16, BN=16)
    return z


def dot_precision(dtype: torch.dtype, on_gpu: bool) -> str:
    """``tl.dot`` input precision for fp32 operands (bf16/fp16 operands ignore it: tensor cores, fp32 sums).

    GPU: tf32 tensor cores. IEEE fp32 dots lower to FMA chains that need more registers than a thread has: the
    backward dK/dV kernel spilled 0.5 KB at head dim 64 and 7 KB at 128 (``python -m ehrfm.kernels.aot``), so
    fp32 training gets tf32 attention, as cuBLAS does with TF32 allowed. Interpreter (CPU tests): IEEE fp32
    for fp32/fp64 inputs, so they match the reference to 1e-5."""
    if on_gpu or dtype not in (torch.float32, torch.float64):
        return "tf32"
    return "ieee"


def _autotuned(name: str):
    """The GPU autotuner of kernel ``name``: candidates from :mod:`.tiles`, pruned to the launch's operand
    dtype and head dim, timed once per (head dim, causal, argument dtypes) and cached for the process."""
    every = sorted({tile for lists in tiles.GPU_TILES[name].values() for tile in lists} | {tiles.LARGE_HEAD_DIM_TILE})
    configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in every]

    def prune(configs, named_args, **kwargs):
        operand = named_args[tiles.OPERAND_ARG[name]]
        dtype = operand.dtype if isinstance(operand, torch.Tensor) else torch.float32
        keep = tiles.gpu_candidates(name, dtype, kwargs["BD"])
        return [c for c in configs if (c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) in keep]

    return autotuner(f"anaa:{name}", globals()[name], configs, key=["d", "CAUSAL"], prune=prune)


def _launch(name: str, n: int, programs: int, *args, **constexprs) -> None:
    """Run kernel ``name`` over ``cdiv(n, resident tile) x programs``: autotuned on a GPU, the interpreter's
    fixed tile on CPU."""
    grid_tile = tiles.GRID_TILE[name]
    if args[0].is_cuda:
        _autotuned(name)[lambda meta: (triton.cdiv(n, meta[grid_tile]), programs)](*args, **constexprs)
    else:
        bm, bn, warps, _ = tiles.INTERPRETER_TILE
        tile = {"BM": bm, "BN": bn}
        globals()[name][(triton.cdiv(n, tile[grid_tile]), programs)](*args, **constexprs, **tile, num_warps=warps)


class _FusedANAA(torch.autograd.Function):
    """(q, k, V') -> (Y_A, Y_Z, r), all float32; see the module docstring. q, k and V' are read in bf16/fp16
    when q is (fp32 otherwise), every sum is fp32."""

    @staticmethod
    def forward(ctx, q, k, vp, doc32, z, seed: int, causal: bool, noise_mode: int, prec: str):
        B, H, n, d = q.shape
        op = operand_dtype(q.dtype, q.is_cuda)
        q, k, vp = (t.to(op).contiguous() for t in (q, k, vp))
        bd = tiles.block_d(d)
        ya = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        r = torch.empty(B, H, n, dtype=torch.float32, device=q.device)
        lse = torch.empty_like(r)
        dstart, dend = document_bounds(doc32)
        _launch(
            "_anaa_fwd",
            n,
            B * H,
            q,
            k,
            vp,
            doc32,
            dstart,
            dend,
            ya,
            r,
            lse,
            n,
            H,
            d,
            d**-0.5,
            CAUSAL=causal,
            BD=bd,
            PREC=prec,
        )
        zz = z.float().contiguous() if z is not None else ya  # unused pointer unless explicit noise
        if noise_mode == NOISE_OFF:
            yz = torch.zeros_like(ya)
        else:
            yz = torch.empty_like(ya)
            _launch(
                "_anaa_noise_fwd",
                n,
                B * H,
                vp,
                doc32,
                dstart,
                dend,
                zz,
                yz,
                seed,
                n,
                H,
                d,
                CAUSAL=causal,
                NOISE=noise_mode,
                BD=bd,
                PREC=prec,
            )
        ctx.save_for_backward(q, k, vp, doc32, zz, ya, r, lse)
        ctx.seed, ctx.causal, ctx.noise_mode, ctx.prec = seed, causal, noise_mode, prec
        return ya, yz, r

    @staticmethod
    def backward(ctx, dya, dyz, dr):
        q, k, vp, doc32, zz, ya, r, lse = ctx.saved_tensors
        B, H, n, d = q.shape
        bd = tiles.block_d(d)
        dstart, dend = document_bounds(doc32)
        dya = torch.zeros_like(ya) if dya is None else dya.float()
        delta = (dya * ya).sum(-1).contiguous()  # from the fp32 gradient, before it is read in the operand dtype
        dya = dya.to(q.dtype).contiguous()
        dr = torch.zeros_like(r) if dr is None else dr.float().contiguous()
        f32 = dict(dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.empty(q.shape, **f32), torch.empty(k.shape, **f32), torch.empty(vp.shape, **f32)
        common = dict(CAUSAL=ctx.causal, BD=bd, PREC=ctx.prec)
        # the arguments the dK/dV and dQ kernels share, in their order: inputs, documents, softmax statistics
        shared = (q, k, vp, doc32, dstart, dend, dya, lse, delta, dr, r)
        _launch("_anaa_bwd_dkdv", n, B * H, *shared, dk, dv, n, H, d, d**-0.5, **common)
        if ctx.noise_mode != NOISE_OFF and dyz is not None:
            dvz = torch.empty(vp.shape, **f32)
            _launch(
                "_anaa_noise_bwd_dv",
                n,
                B * H,
                doc32,
                dstart,
                dend,
                zz,
                dyz.to(q.dtype).contiguous(),
                dvz,
                ctx.seed,
                n,
                H,
                d,
                NOISE=ctx.noise_mode,
                **common,
            )
            dv += dvz
        _launch("_anaa_bwd_dq", n, B * H, *shared, dq, n, H, d, d**-0.5, **common)
        return dq, dk, dv, None, None, None, None, None, None


def anaa_triton(q, k, v, *, taps, variant, mode, training, doc, noise, seed, detach_sigma, sigma_norm):
    """q, k, v: (B, H, n, d) on CUDA (or CPU under TRITON_INTERPRET=1); doc (B, n), 0 = pad; noise: explicit
    Z (debug mode) or None (Philox with ``seed``; None draws a seed from torch's RNG). Returns (B, H, n, d)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "impl='triton' needs CUDA tensors (on CPU: set TRITON_INTERPRET=1 before importing "
            "triton, or use impl='factorized')"
        )
    causal = variant == "causal"
    smooth = mode != "rna"
    use_noise = training and mode != "smooth"
    if use_noise and noise is None and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    noise_mode = NOISE_OFF if not use_noise else (NOISE_EXPLICIT if noise is not None else NOISE_PHILOX)
    valid = (doc != 0)[:, None, :, None].to(torch.float32)
    starts = run_starts_index(doc)
    vp = v.float() * valid
    if smooth:
        vp = conv_rows(vp, taps, doc, variant, transpose=True)
    doc32 = doc.to(torch.int32).contiguous()
    prec = dot_precision(q.dtype, q.is_cuda)
    ya, yz, r = _FusedANAA.apply(q, k, vp, doc32, noise, int(seed or 0), causal, noise_mode, prec)
    y = ya
    if mode != "smooth":
        msum = segment_cumsum(vp, starts) if causal else segment_sum(vp, starts)
        mu, sigma = noise_statistics(r, doc, starts, sigma_norm)
        y = y + mu[..., None] * msum
        if use_noise:
            if detach_sigma:
                sigma = sigma.detach()
            y = y + sigma[..., None] * yz
    y = y * valid
    if smooth:
        y = conv_rows(y, taps, doc, variant, transpose=False)
    return y.to(q.dtype)

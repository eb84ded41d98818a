"""Fused ANAA attention in Triton: flash-attention tiles, online S2, in-kernel Philox noise (forward + backward).

The kernel computes, per (batch, head) and tile of query rows, with V' = G_k^T V already convolved (O(n d)):

    Y_A = softmax(S) V'         (online softmax over key tiles; S = q k^T / sqrt(d), masked)
    Y_Z = (Z . M) V'            (separate accumulator: the noise never enters the softmax loop)
    r_i = sum_j A_ij^2          (online: s2 <- s2 * alpha^2 + sum p^2, divided by l^2 at the end)
    lse_i                       (for the backward pass)

and PyTorch finishes the O(n d) epilogue: per-document mu = 1/L and sigma from r (eq. 6-7),
``Y = Y_A + mu * (M V') + sigma * Y_Z`` and ``O = G_q Y``. Masks: padding and packed documents via a
(batch, seq) int32 document-id vector (0 = pad), causal via the tile index.

Noise: ``z_ij = randn(seed, ((b * H + h) * n + i) * n + j)`` (Philox, 64-bit counter), regenerated tile by tile in
backward for dV' += Z^T dY_Z -- no n x n tensor is ever stored. Debug mode (``noise`` given) loads the
materialised Z instead, so outputs and gradients can be compared exactly with the reference;
:func:`philox_noise` materialises the Philox Z a kernel uses, for tests.

Backward (two kernels, no atomics): dS_ij = P_ij (dP_ij - Delta_i + 2 dr_i (P_ij - r_i)), with
dP = dY_A V'^T, Delta_i = dY_A_i . Y_A_i, and dr the gradient reaching r through sigma (0 when detached).

On CPU the kernels run under ``TRITON_INTERPRET=1`` (tests, fp32, small shapes). Inputs are upcast to fp32 and
accumulation is fp32; dots are tf32 on GPU and IEEE fp32 for fp32 inputs under the interpreter
(:func:`dot_precision`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
    """The (BM, BN) noise tile of keys start_n..start_n+BN: loaded (explicit Z) or drawn (Philox, four normals
    per call: element (i, j) is component j % 4 of counter (bh * n + i) * ceil(n / 4) + j // 4; start_n is a
    multiple of 4)."""
    if NOISE == 2:
        offs_n = start_n + tl.arange(0, BN)
        ptr = Z + bh.to(tl.int64) * n * n + offs_m[:, None].to(tl.int64) * n + offs_n[None, :]
        z = tl.load(ptr, mask=ok, other=0.0)
    else:
        quads = (n + 3) // 4
        ctr = (bh.to(tl.int64) * n + offs_m[:, None].to(tl.int64)) * quads + (start_n // 4 + tl.arange(0, BN // 4))[None, :]
        z0, z1, z2, z3 = tl.randn4x(seed, ctr)
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), (offs_m.shape[0], BN))
    return tl.where(ok, z, 0.0)


@triton.jit
def _key_range(DSTART, DEND, b, n, offs, ok, BLOCK: tl.constexpr):
    """[lo, hi) covering every position the documents of ``offs`` span; lo aligned down to BLOCK. Tiles
    outside it hold no position of these documents: skipped (an all-padding tile gives an empty range)."""
    start = tl.where(ok, tl.load(DSTART + b * n + offs, mask=ok, other=0), n)
    end = tl.where(ok, tl.load(DEND + b * n + offs, mask=ok, other=0), 0)
    return (tl.min(start, 0) // BLOCK) * BLOCK, tl.max(end, 0)


@triton.jit
def _anaa_fwd(Q, K, V, DOC, DSTART, DEND, Z, YA, YZ, R, LSE, seed, n, H, d, scale,
              CAUSAL: tl.constexpr, NOISE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
              PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    base = bh.to(tl.int64) * n * d
    row_ok = offs_m < n
    q_mask = row_ok[:, None] & (offs_d[None, :] < d)
    q = tl.load(Q + base + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
    doc_q = tl.load(DOC + b * n + offs_m, mask=row_ok, other=0)
    m_i = tl.full((BM,), NEG, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    s2 = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    accz = tl.zeros((BM, BD), tl.float32)
    lo, hi = _key_range(DSTART, DEND, b, n, offs_m, row_ok, BN)
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BM)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        col_ok = offs_n < n
        kv_mask = col_ok[:, None] & (offs_d[None, :] < d)
        k = tl.load(K + base + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
        doc_k = tl.load(DOC + b * n + offs_n, mask=col_ok, other=-1)
        ok = _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(ok, s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        s2 = s2 * alpha * alpha + tl.sum(p * p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
        if NOISE != 0:
            z = _noise_tile(Z, seed, bh, offs_m, start_n, n, ok, NOISE, BN)
            accz += tl.dot(z, v, input_precision=PREC)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out_mask = row_ok[:, None] & (offs_d[None, :] < d)
    tl.store(YA + base + offs_m[:, None] * d + offs_d[None, :], acc / l_safe[:, None], mask=out_mask)
    tl.store(YZ + base + offs_m[:, None] * d + offs_d[None, :], accz, mask=out_mask)
    tl.store(R + bh * n + offs_m, s2 / (l_safe * l_safe), mask=row_ok)
    tl.store(LSE + bh * n + offs_m, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _anaa_bwd_dkdv(Q, K, V, DOC, DSTART, DEND, Z, DYA, DYZ, LSE, DELTA, DR, R, DK, DV, seed, n, H, d, scale,
                   CAUSAL: tl.constexpr, NOISE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    base = bh.to(tl.int64) * n * d
    col_ok = offs_n < n
    kv_mask = col_ok[:, None] & (offs_d[None, :] < d)
    k = tl.load(K + base + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
    doc_k = tl.load(DOC + b * n + offs_n, mask=col_ok, other=-1)
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    lo, hi = _key_range(DSTART, DEND, b, n, offs_n, col_ok, BM)  # the queries that can see this key tile
    if CAUSAL:
        lo = tl.maximum(lo, (pid_n * BN // BM) * BM)
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        row_ok = offs_m < n
        q_mask = row_ok[:, None] & (offs_d[None, :] < d)
        q = tl.load(Q + base + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
        dya = tl.load(DYA + base + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
        doc_q = tl.load(DOC + b * n + offs_m, mask=row_ok, other=0)
        lse = tl.load(LSE + bh * n + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * n + offs_m, mask=row_ok, other=0.0)
        dr = tl.load(DR + bh * n + offs_m, mask=row_ok, other=0.0)
        r = tl.load(R + bh * n + offs_m, mask=row_ok, other=0.0)
        ok = _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL)
        s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, NEG)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), dya, input_precision=PREC)
        if NOISE != 0:
            dyz = tl.load(DYZ + base + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
            z = _noise_tile(Z, seed, bh, offs_m, pid_n * BN, n, ok, NOISE, BN)
            dv += tl.dot(tl.trans(z), dyz, input_precision=PREC)
        dp = tl.dot(dya, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None] + 2.0 * dr[:, None] * (p - r[:, None]))
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC) * scale
    tl.store(DK + base + offs_n[:, None] * d + offs_d[None, :], dk, mask=kv_mask)
    tl.store(DV + base + offs_n[:, None] * d + offs_d[None, :], dv, mask=kv_mask)


@triton.jit
def _anaa_bwd_dq(Q, K, V, DOC, DSTART, DEND, DYA, LSE, DELTA, DR, R, DQ, n, H, d, scale,
                 CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    base = bh.to(tl.int64) * n * d
    row_ok = offs_m < n
    q_mask = row_ok[:, None] & (offs_d[None, :] < d)
    q = tl.load(Q + base + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
    dya = tl.load(DYA + base + offs_m[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)
    doc_q = tl.load(DOC + b * n + offs_m, mask=row_ok, other=0)
    lse = tl.load(LSE + bh * n + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * n + offs_m, mask=row_ok, other=0.0)
    dr = tl.load(DR + bh * n + offs_m, mask=row_ok, other=0.0)
    r = tl.load(R + bh * n + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BM, BD), tl.float32)
    lo, hi = _key_range(DSTART, DEND, b, n, offs_m, row_ok, BN)
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BM)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        col_ok = offs_n < n
        kv_mask = col_ok[:, None] & (offs_d[None, :] < d)
        k = tl.load(K + base + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * d + offs_d[None, :], mask=kv_mask, other=0.0)
        doc_k = tl.load(DOC + b * n + offs_n, mask=col_ok, other=-1)
        ok = _tile_mask(doc_q, doc_k, offs_m, offs_n, CAUSAL)
        s = tl.where(ok, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, NEG)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(dya, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None] + 2.0 * dr[:, None] * (p - r[:, None]))
        dq += tl.dot(ds, k, input_precision=PREC) * scale
    tl.store(DQ + base + offs_m[:, None] * d + offs_d[None, :], dq, mask=q_mask)


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
    """``tl.dot`` input precision for inputs of ``dtype`` (the kernels see them upcast to fp32).

    GPU: tf32 tensor cores for every input dtype. IEEE fp32 dots lower to FMA chains that need more registers
    than a thread has: the backward dK/dV kernel spilled 0.5 KB at head dim 64 and 7 KB at 128 (``python -m
    ehrfm.kernels.aot``), so fp32 training gets tf32 attention, as cuBLAS does with TF32 allowed.
    Interpreter (CPU tests): IEEE fp32 for fp32/fp64 inputs, so they match the reference to 1e-5."""
    if on_gpu or dtype not in (torch.float32, torch.float64):
        return "tf32"
    return "ieee"


def _blocks(d: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BM, BN, BD, num_warps). Interpreter: 16 x 16 tiles (fast enough on CPU). GPU: the largest tiles that
    compile without register spills on sm_80 and sm_90 with fp32 operands (``python -m ehrfm.kernels.aot``;
    64 x 64 and 64 x 32 tiles spilled up to 1.8 KB): 32 x 32 with 4 warps up to head dim 64, 8 warps at 128.
    Larger tiles need bf16 operands (not yet done). Not yet autotuned on a GPU (``scripts/gpu-check``)."""
    bd = max(16, triton.next_power_of_2(d))
    if not on_gpu or bd > 128:
        return 16, 16, bd, 4
    return (32, 32, bd, 4) if bd <= 64 else (32, 32, bd, 8)


class _FusedANAA(torch.autograd.Function):
    """(q, k, V') -> (Y_A, Y_Z, r), all float32; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, vp, doc32, z, seed: int, causal: bool, noise_mode: int, prec: str):
        B, H, n, d = q.shape
        q, k, vp = (t.float().contiguous() for t in (q, k, vp))
        dstart, dend = document_bounds(doc32)
        ya = torch.empty_like(q)
        yz = torch.empty_like(q)
        r = torch.empty(B, H, n, dtype=torch.float32, device=q.device)
        lse = torch.empty_like(r)
        BM, BN, BD, warps = _blocks(d, q.is_cuda)
        zz = z.float().contiguous() if z is not None else ya  # unused pointer unless explicit noise
        _anaa_fwd[(triton.cdiv(n, BM), B * H)](q, k, vp, doc32, dstart, dend, zz, ya, yz, r, lse, seed, n, H, d,
                                               d ** -0.5, CAUSAL=causal, NOISE=noise_mode, BM=BM, BN=BN, BD=BD,
                                               PREC=prec, num_warps=warps)
        ctx.save_for_backward(q, k, vp, doc32, dstart, dend, zz, ya, r, lse)
        ctx.seed, ctx.causal, ctx.noise_mode, ctx.prec = seed, causal, noise_mode, prec
        return ya, yz, r

    @staticmethod
    def backward(ctx, dya, dyz, dr):
        q, k, vp, doc32, dstart, dend, zz, ya, r, lse = ctx.saved_tensors
        B, H, n, d = q.shape
        dya = torch.zeros_like(ya) if dya is None else dya.float().contiguous()
        dyz = torch.zeros_like(ya) if dyz is None else dyz.float().contiguous()
        dr = torch.zeros_like(r) if dr is None else dr.float().contiguous()
        delta = (dya * ya).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(vp)
        BM, BN, BD, warps = _blocks(d, q.is_cuda)
        _anaa_bwd_dkdv[(triton.cdiv(n, BN), B * H)](
            q, k, vp, doc32, dstart, dend, zz, dya, dyz, lse, delta, dr, r, dk, dv, ctx.seed, n, H, d, d ** -0.5,
            CAUSAL=ctx.causal, NOISE=ctx.noise_mode, BM=BM, BN=BN, BD=BD, PREC=ctx.prec, num_warps=warps)
        _anaa_bwd_dq[(triton.cdiv(n, BM), B * H)](
            q, k, vp, doc32, dstart, dend, dya, lse, delta, dr, r, dq, n, H, d, d ** -0.5,
            CAUSAL=ctx.causal, BM=BM, BN=BN, BD=BD, PREC=ctx.prec, num_warps=warps)
        return dq, dk, dv, None, None, None, None, None, None


def anaa_triton(q, k, v, *, taps, variant, mode, training, doc, noise, seed, detach_sigma, sigma_norm):
    """q, k, v: (B, H, n, d) on CUDA (or CPU under TRITON_INTERPRET=1); doc (B, n), 0 = pad; noise: explicit
    Z (debug mode) or None (Philox with ``seed``; None draws a seed from torch's RNG). Returns (B, H, n, d)."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("impl='triton' needs CUDA tensors (on CPU: set TRITON_INTERPRET=1 before importing "
                           "triton, or use impl='factorized')")
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

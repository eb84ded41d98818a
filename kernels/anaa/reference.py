"""Naive ANAA exactly as the paper states it (000, eqs. 5-10): the oracle for every other path.

Per (batch row, document of length L, head), on the L x L valid block:

    A     = softmax(Q K^T / sqrt(d))                     (causal mask inside the block for variant="causal")
    mu    = mean(A) over all L^2 entries                 (eq. 6; equals 1/L because rows sum to 1)
    sigma = sqrt(sum_ij (A_ij - mu)^2 / D)               (eq. 7; D = L - 1 ("paper") or L^2 - 1 ("entries"))
    N     = mu + sigma * Z,  Z ~ N(0, 1) i.i.d.          (training; eval replaces N by mu, eq. 10)
    O     = conv2d(A + N, K) @ V                         (eq. 5, explicit 2D convolution, zero padding at the edge)

Causal variant: N (and the eval mu) only on the lower triangle, and K = g_q g_k^T is anchored in the
(past rows, future columns) quadrant so that the smoothed matrix stays lower triangular (see ``gaussian.py``).
Modes: "anaa" (noise + smoothing), "rna" (noise only: O = (A + N) V), "smooth" (smoothing only: O = conv2d(A) V).

Memory O(n^2) per head -- this is the paper's limitation the other paths remove.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .masks import check_contiguous


def smooth2d(M: torch.Tensor, taps: torch.Tensor, variant: str) -> torch.Tensor:
    """Explicit 2D convolution of M (heads, L, L) with the kernel built from the 1D taps, zero padding."""
    k = taps.shape[0]
    taps = taps.to(M.dtype)
    if variant == "causal":
        # out[i, j] = sum_ab g[a] g[b] M[i - a, j + b]
        K = torch.outer(taps.flip(0), taps)
        pad = (0, k - 1, k - 1, 0)
    else:
        # out[i, j] = sum_ab g[a] g[b] M[i + a - c, j + b - c]
        c = (k - 1) // 2
        K = torch.outer(taps, taps)
        pad = (c, k - 1 - c, c, k - 1 - c)
    return F.conv2d(F.pad(M[:, None], pad), K[None, None])[:, 0]


def anaa_reference(q, k, v, *, taps, variant, mode, training, doc, noise, generator, detach_sigma, sigma_norm):
    """q, k, v: (batch, heads, seq, head_dim); doc: (batch, seq) int, 0 = pad; noise: (batch, heads, seq, seq)
    standard normal or None (then drawn here from ``generator`` with the full (batch, heads, seq, seq) shape).
    Returns (batch, heads, seq, head_dim), zero at padding."""
    B, H, n, d = q.shape
    check_contiguous(doc)
    causal = variant == "causal"
    use_noise = training and mode != "smooth"
    if use_noise and noise is None:
        noise = torch.randn(B, H, n, n, generator=generator, device=q.device, dtype=torch.float32).to(q.dtype)
    out = torch.zeros_like(v)
    rows = []
    for b in range(B):
        for doc_id in torch.unique(doc[b]).tolist():
            if doc_id == 0:
                continue
            idx = torch.nonzero(doc[b] == doc_id).flatten()
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            L = hi - lo
            s = q[b, :, lo:hi] @ k[b, :, lo:hi].transpose(-1, -2) / math.sqrt(d)
            if causal:
                tri = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
                s = s.masked_fill(~tri, float("-inf"))
            A = torch.softmax(s, dim=-1)
            M = A
            if mode != "smooth":
                mu = A.mean(dim=(-1, -2), keepdim=True)
                if use_noise:
                    denom = (L - 1) if sigma_norm == "paper" else (L * L - 1)
                    sigma = torch.sqrt(((A - mu) ** 2).sum(dim=(-1, -2), keepdim=True) / max(denom, 1))
                    if detach_sigma:
                        sigma = sigma.detach()
                    N = mu + sigma * noise[b, :, lo:hi, lo:hi]
                else:
                    N = mu.expand(H, L, L)
                if causal:
                    N = N * tri
                M = A + N
            if mode != "rna":
                M = smooth2d(M, taps, variant)
            rows.append((b, lo, hi, M @ v[b, :, lo:hi]))
    # assemble without in-place writes into a tensor autograd tracks
    for b, lo, hi, o in rows:
        out = out.index_put(
            (
                torch.tensor([b], device=q.device)[:, None, None],
                torch.arange(H, device=q.device)[None, :, None],
                torch.arange(lo, hi, device=q.device)[None, None, :],
            ),
            o[None],
        )
    return out

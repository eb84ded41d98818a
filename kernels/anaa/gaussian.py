"""Gaussian taps, the kernel-size rule and document-aware 1D convolutions along the sequence.

ANAA smooths the (noisy) attention matrix with a 2D Gaussian kernel. The kernel is built separable,
``K = g_q g_k^T``, so smoothing ``M`` equals ``G_q M G_k^T`` with banded Toeplitz matrices ``G_q``, ``G_k`` of the
1D taps; the factorized and Triton paths never form ``K`` or ``M`` and use the 1D convolutions in this module.

Conventions (the reference in ``reference.py`` implements exactly these with ``F.conv2d``):

* kernel size ``k = clamp(round(2 * pi * sigma_eh), 2, 7)`` -- the paper's ``k = 2 pi sigma`` (eq. 9) rounded to the
  nearest integer, which reproduces the paper's pairs 0.33 -> 2 and 1.0 -> 6. ``kernel_size=`` overrides it.
* taps are normalised to sum 1 (so the 2D kernel sums to 1 and smoothing keeps the row mass in the interior).
  The paper's ``1 / (2 pi sigma^2)`` is the normaliser of the continuous density; with 2 discrete taps at
  ``sigma=0.33`` it would multiply all attention weights by about 1.49.
* symmetric variant: tap ``a`` (``a = 0..k-1``) sits at offset ``a - c`` with ``c = (k - 1) // 2``, i.e. PyTorch's
  ``padding='same'`` anchor; for even ``k`` the kernel is one step longer on the right, so ``G`` is not symmetric and
  ``G^T`` uses the flipped taps.  ``G[i, p] = g[p - i + c]``.
* causal variant: one-sided taps ``g[a] ~ exp(-a^2 / 2 sigma^2)`` over offsets ``0..k-1`` into the past.
  ``G_q[i, p] = g[i - p]`` (lower band), ``G_k[j, q] = g[q - j]`` (upper band), so both ``V' = G_k^T V`` and
  ``O = G_q Y`` only read the current and earlier positions.
* zero 'same' padding at the edges of every document: a tap never reads across a document boundary
  (``document_ids`` differ) or into padding (``document_ids == 0``).
"""

from __future__ import annotations

import math

import torch

MIN_KERNEL_SIZE = 2
MAX_KERNEL_SIZE = 7


def kernel_size_for(sigma_eh: float) -> int:
    """Kernel size for the event-horizon std ``sigma_eh`` (in positions): ``clamp(round(2 pi sigma), 2, 7)``."""
    if sigma_eh <= 0:
        raise ValueError(f"sigma_eh must be > 0, got {sigma_eh}")
    return int(min(MAX_KERNEL_SIZE, max(MIN_KERNEL_SIZE, round(2.0 * math.pi * sigma_eh))))


def gaussian_taps(sigma_eh: float, kernel_size: int, variant: str, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """1D taps ``g`` of length ``kernel_size`` (unit sum) for ``variant`` in {"symmetric", "causal"}.

    Tap ``a`` sits at offset ``a - (k - 1) // 2`` (symmetric) or ``-a`` (causal, ``a`` steps into the past).
    """
    if not MIN_KERNEL_SIZE <= kernel_size <= MAX_KERNEL_SIZE:
        raise ValueError(f"kernel_size must be in [{MIN_KERNEL_SIZE}, {MAX_KERNEL_SIZE}], got {kernel_size}")
    a = torch.arange(kernel_size, dtype=torch.float64)
    if variant == "symmetric":
        offsets = a - (kernel_size - 1) // 2
    elif variant == "causal":
        offsets = a
    else:
        raise ValueError(f"variant must be 'symmetric' or 'causal', got {variant!r}")
    g = torch.exp(-0.5 * (offsets / sigma_eh) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def _shift(x: torch.Tensor, doc: torch.Tensor, offset: int) -> torch.Tensor:
    """``x[..., i + offset, :]`` where position ``i + offset`` exists and is in the same (non-pad) document as ``i``,
    else 0. ``x`` (batch, heads, seq, dim); ``doc`` (batch, seq) int, 0 = padding."""
    n = x.shape[-2]
    if offset == 0:
        return x * (doc != 0)[:, None, :, None]
    if abs(offset) >= n:
        return torch.zeros_like(x)
    shifted = torch.zeros_like(x)
    dshift = torch.zeros_like(doc)
    if offset > 0:
        shifted[..., : n - offset, :] = x[..., offset:, :]
        dshift[:, : n - offset] = doc[:, offset:]
    else:
        shifted[..., -offset:, :] = x[..., : n + offset, :]
        dshift[:, -offset:] = doc[:, : n + offset]
    same = (dshift == doc) & (doc != 0)
    return shifted * same[:, None, :, None]


def conv_rows(x: torch.Tensor, taps: torch.Tensor, doc: torch.Tensor, variant: str, *, transpose: bool) -> torch.Tensor:
    """Apply ``G`` (``transpose=False``) or ``G^T`` (``transpose=True``) along the sequence axis.

    x: (batch, heads, seq, dim); taps: (k,); doc: (batch, seq) int document ids, 0 = padding.
    Symmetric: ``(G x)[i] = sum_a g[a] x[i + a - c]``, ``(G^T x)[i] = sum_a g[a] x[i - a + c]``.
    Causal: ``(G_q x)[i] = (G_k^T x)[i] = sum_a g[a] x[i - a]`` -- both only look into the past.
    Returns a tensor shaped like ``x``, zero at padding.
    """
    k = taps.shape[0]
    taps = taps.to(dtype=x.dtype, device=x.device)
    out = None
    for a in range(k):
        if variant == "causal":
            offset = -a
        else:
            c = (k - 1) // 2
            offset = (c - a) if transpose else (a - c)
        term = taps[a] * _shift(x, doc, offset)
        out = term if out is None else out + term
    return out


def toeplitz(taps: torch.Tensor, n: int, variant: str, side: str) -> torch.Tensor:
    """Dense ``G`` (symmetric; ``side`` ignored), ``G_q`` (``side="q"``) or ``G_k`` (``side="k"``), shape (n, n).
    For tests and the documentation of the conventions only."""
    k = taps.shape[0]
    G = torch.zeros(n, n, dtype=taps.dtype, device=taps.device)
    for a in range(k):
        if variant == "causal":
            # G_q[i, i - a] = g[a];  G_k[j, j + a] = g[a]
            off = -a if side == "q" else a
        else:
            off = a - (k - 1) // 2  # G[i, i + off] = g[a]
        G = G + taps[a] * torch.diag(torch.ones(n - abs(off), dtype=taps.dtype, device=taps.device), off)
    return G

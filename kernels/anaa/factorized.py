"""Factorized ANAA in plain PyTorch: the CPU path, O(n d) memory besides the attention itself.

Separability turns the paper's operator into (``V' = G_k^T V``, ``M`` = the allowed-entries mask)

    Y = A V'  +  mu * (M V')  +  sigma * ((Z . M) V')          O = G_q Y

* ``A V'`` is one ``scaled_dot_product_attention`` call (flash kernel on CPU/GPU when the mask allows).
* ``M V'`` is a per-document sum of V' (symmetric) or a per-document cumulative sum (causal); mu = 1/L exactly.
* sigma needs ``S2 = sum_ij A_ij^2``: computed by :class:`RowSquareSum`, which streams row chunks of A and
  recomputes them in backward, so it never stores an n x n matrix. Then ``sum_ij (A_ij - mu)^2 = S2 - 1`` (rows
  sum to 1, mu = 1/L). Gradient: ``d r_i / d s_ij = 2 A_ij (A_ij - r_i)`` with ``r_i = sum_j A_ij^2``.
* noise term ``Y_Z = (Z . M) V'``:
  - ``noise`` given (test mode): computed exactly from the explicit Z -- identical to the reference.
  - otherwise: :func:`sample_noise_product` draws Y_Z exactly in distribution in O(n (c + d) d) time without any
    n x n Z: row i of Y_Z is ``sum_{j allowed} z_ij v'_j`` ~ N(0, sum_{j allowed} v'_j v'_j^T), independent across
    rows. Columns are split into the query row's own chunk of c positions (explicit c x c Gaussian block, exact)
    and the rest of its document left / right of the chunk, whose Gram matrix is carried by a running R factor
    (R^T R = Gram, updated by a small QR per chunk); that part is sampled as ``eps R`` with eps ~ N(0, I_d).
    R is formed as ``Q^T [R_prev; V'_chunk]`` with Q from a QR of the detached stack, so the sample is linear in
    V' with Q held fixed: gradients are the reparameterisation gradient of the Rao-Blackwellised estimator
    (Z projected on the span of the document's V' rows), unbiased for the gradient of the expected loss and
    never differentiating through a matrix square root.

Gradient through sigma: ``detach_sigma=True`` (default) treats sigma as a constant scale, like the noise itself;
False differentiates through S2 (one extra term per score). d mu / d scores is exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gaussian import conv_rows
from .masks import allowed, run_starts_index, segment_cumsum, segment_sum


def _chunk_rows(B: int, H: int, n: int, budget: int = 1 << 20) -> int:
    return max(16, min(n, budget // max(1, B * H * n)))


def _chunk_scores(q_c, k, doc, rows, causal, scale):
    """Softmax rows ``rows`` (a slice) of the attention; masked-out and padding rows handled. (B, H, c, n)."""
    s = (q_c @ k.transpose(-1, -2)) * scale
    n = k.shape[-2]
    m = doc[:, rows, None] == doc[:, None, :]
    if causal:
        i = torch.arange(rows.start, rows.stop, device=doc.device)[:, None]
        m = m & (torch.arange(n, device=doc.device)[None, :] <= i)
    s = s.masked_fill(~m[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


class RowSquareSum(torch.autograd.Function):
    """r_i = sum_j A_ij^2 for A = masked softmax(q k^T * scale); (B, H, n), 0 at padding rows. Streams row
    chunks in forward and recomputes them in backward (O(chunk * n) memory)."""

    @staticmethod
    def forward(ctx, q, k, doc, causal: bool, scale: float):
        B, H, n, _ = q.shape
        c = _chunk_rows(B, H, n)
        r = torch.empty(B, H, n, dtype=q.dtype, device=q.device)
        for s0 in range(0, n, c):
            rows = slice(s0, min(n, s0 + c))
            A = _chunk_scores(q[:, :, rows], k, doc, rows, causal, scale)
            r[:, :, rows] = (A * A).sum(-1)
        r = r * (doc != 0)[:, None]
        ctx.save_for_backward(q, k, doc, r)
        ctx.causal, ctx.scale, ctx.chunk = causal, scale, c
        return r

    @staticmethod
    def backward(ctx, dr):
        q, k, doc, r = ctx.saved_tensors
        n = q.shape[2]
        dr = dr * (doc != 0)[:, None]
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        for s0 in range(0, n, ctx.chunk):
            rows = slice(s0, min(n, s0 + ctx.chunk))
            A = _chunk_scores(q[:, :, rows], k, doc, rows, ctx.causal, ctx.scale)
            dS = 2.0 * dr[:, :, rows, None] * A * (A - r[:, :, rows, None])
            dq[:, :, rows] = (dS @ k) * ctx.scale
            dk += (dS.transpose(-1, -2) @ q[:, :, rows]) * ctx.scale
        return dq, dk, None, None, None


def noise_statistics(r: torch.Tensor, doc: torch.Tensor, starts: torch.Tensor, sigma_norm: str):
    """Per-position (B, H, n) mu and sigma of the position's document from row square sums r (B, H, n)."""
    valid = (doc != 0)[:, None].to(r.dtype)
    L = segment_sum(valid.expand_as(r).contiguous(), starts)
    S2 = segment_sum(r, starts)
    Lc = L.clamp_min(1.0)
    mu = valid / Lc
    if sigma_norm == "paper":
        denom = (Lc - 1).clamp_min(1.0)
    elif sigma_norm == "entries":
        denom = (Lc * Lc - 1).clamp_min(1.0)
    else:
        raise ValueError(f"sigma_norm must be 'paper' or 'entries', got {sigma_norm!r}")
    var = (S2 - valid).clamp_min(torch.finfo(r.dtype).tiny) / denom
    return mu, torch.sqrt(var) * valid


def _qr_update(R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """R factor (d x d, R^T R = R_prev^T R_prev + rows^T rows), linear in the inputs with Q held fixed."""
    stacked = torch.cat([R, rows], dim=-2)
    Q = torch.linalg.qr(stacked.detach().double()).Q.to(stacked.dtype)
    return Q.transpose(-1, -2) @ stacked


def sample_noise_product(vp: torch.Tensor, doc: torch.Tensor, causal: bool, generator=None, chunk: int = 64):
    """A draw of ``(Z . M) V'`` (B, H, n, d) for Z i.i.d. N(0, 1), exact in distribution, no n x n tensor.

    vp: (B, H, n, d), zero at padding; doc: (B, n) contiguous documents, 0 = pad. See the module docstring.
    """
    B, H, n, d = vp.shape
    c = chunk
    n_pad = -(-n // c) * c
    if n_pad != n:
        vp = F.pad(vp, (0, 0, 0, n_pad - n))
        doc = F.pad(doc, (0, n_pad - n))
    nc = n_pad // c
    V = vp.reshape(B, H, nc, c, d)
    D = doc.reshape(B, nc, c)
    dev, dt = vp.device, vp.dtype

    near = (D[..., :, None] == D[..., None, :]) & (D != 0)[..., :, None]
    if causal:
        near = near & torch.ones(c, c, dtype=torch.bool, device=dev).tril()
    Zn = torch.randn(B, H, nc, c, c, generator=generator, device=dev, dtype=dt)
    y = (Zn * near[:, None]) @ V

    def far(order, edge):
        # edge[:, b]: the document at chunk b's left (first) or right (last) edge; R_b covers that document's
        # positions strictly outside chunk b on that side.
        R = torch.zeros(B, H, d, d, dtype=dt, device=dev)
        factors = [None] * nc
        for step, b in enumerate(order):
            factors[b] = R
            if step + 1 < nc:
                nb = order[step + 1]
                keep = (edge[:, nb] == edge[:, b]).to(dt)[:, None, None, None]
                rows = V[:, :, b] * (D[:, b] == edge[:, nb]).to(dt)[:, None, :, None]
                R = _qr_update(R * keep, rows)
        Rs = torch.stack(factors, dim=2)  # (B, H, nc, d, d)
        eps = torch.randn(B, H, nc, c, d, generator=generator, device=dev, dtype=dt)
        sel = ((D == edge[..., None]) & (D != 0)).to(dt)[:, None, ..., None]
        return (eps @ Rs) * sel

    y = y + far(list(range(nc)), D[:, :, 0])
    if not causal:
        y = y + far(list(range(nc - 1, -1, -1)), D[:, :, -1])
    return y.reshape(B, H, n_pad, d)[:, :, :n]


def anaa_factorized(q, k, v, *, taps, variant, mode, training, doc, noise, generator, detach_sigma, sigma_norm):
    """q, k, v: (B, H, n, d); taps (k,); doc (B, n) int, 0 = pad; noise (B, H, n, n) or None.
    Returns (B, H, n, d), zero at padding."""
    B, H, n, d = q.shape
    causal = variant == "causal"
    smooth = mode != "rna"
    valid = (doc != 0)[:, None, :, None].to(v.dtype)
    starts = run_starts_index(doc)
    vp = v * valid
    if smooth:
        vp = conv_rows(vp, taps, doc, variant, transpose=True)

    single_doc = bool((doc == doc[:, :1]).all()) and bool((doc != 0).all())
    mask = None if single_doc else allowed(doc, causal) | torch.eye(n, dtype=torch.bool, device=q.device)
    y = F.scaled_dot_product_attention(q, k, vp, attn_mask=mask, is_causal=causal and mask is None)

    if mode != "smooth":
        msum = segment_cumsum(vp, starts) if causal else segment_sum(vp, starts)
        if training:
            r = RowSquareSum.apply(q, k, doc, causal, d**-0.5)
            mu, sigma = noise_statistics(r, doc, starts, sigma_norm)
            if detach_sigma:
                sigma = sigma.detach()
            if noise is not None:
                yz = (noise.to(vp.dtype) * allowed(doc, causal)) @ vp
            else:
                yz = sample_noise_product(vp, doc, causal, generator)
            y = y + mu[..., None] * msum + sigma[..., None] * yz
        else:
            mu = (doc != 0).to(v.dtype) / segment_sum((doc != 0).to(v.dtype)[:, None], starts)[:, 0].clamp_min(1.0)
            y = y + mu[:, None, :, None] * msum
    y = y * valid
    if smooth:
        y = conv_rows(y, taps, doc, variant, transpose=False)
    return y

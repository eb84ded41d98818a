"""ANAA: Adaptive Noise-Augmented Attention (000, eqs. 5-10) without the O(n^2) memory.

    anaa_attention(q, k, v, *, sigma_eh, variant="symmetric", training, attention_mask=None, noise=None,
                   seed=None, detach_sigma=True, sigma_norm="paper", impl="auto",
                   document_ids=None, mode="anaa", kernel_size=None) -> (batch, heads, seq, head_dim)

Paths (all compute the same operator; ``reference`` is the oracle):

* ``reference``  -- naive materialised paper operator (explicit N, explicit 2D conv), ``reference.py``.
* ``factorized`` -- ``G_q (A + N) (G_k^T V)`` with SDPA and 1D convolutions, ``factorized.py`` (CPU default).
* ``triton``     -- fused flash-attention-style forward/backward with in-kernel Philox noise, ``triton_kernel.py``
  (default on CUDA; runs under ``TRITON_INTERPRET=1`` on CPU for tests).

Documented choices:

* ``sigma_norm="paper"`` (default) is eq. 7 taken literally: the sum of squared deviations over all L^2 entries
  divided by (L - 1), which makes sigma about sqrt(L) times the entries' std; ``"entries"`` divides by L^2 - 1.
* ``variant="symmetric"`` is the paper's (encoder) operator; ``"causal"`` (one-sided taps, noise and mu only on
  the lower triangle) never lets a position see the future and is the default for decoder (Llama) backbones in
  ``ehrfm.finetune.anaa``.
* kernel size ``clamp(round(2 pi sigma_eh), 2, 7)`` (0.33 -> 2, 1.0 -> 6 as in the paper); taps sum to 1.
* ``detach_sigma=True``: sigma is a constant noise scale for the backward pass (like the noise itself);
  False differentiates through it. mu = 1/L has zero gradient either way.
* statistics mu, sigma are per (batch, head, document); with padding only, per (batch, head).
* ``training=False`` replaces N by mu (eq. 10): deterministic.
"""

from __future__ import annotations

import torch

from .gaussian import gaussian_taps, kernel_size_for
from .masks import document_ids_from

__all__ = ["anaa_attention", "kernel_size_for", "gaussian_taps"]

_IMPLS = ("auto", "reference", "factorized", "triton")
_MODES = ("anaa", "rna", "smooth")


def anaa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sigma_eh: float,
    variant: str = "symmetric",
    training: bool,
    attention_mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    seed: int | None = None,
    detach_sigma: bool = True,
    sigma_norm: str = "paper",
    impl: str = "auto",
    document_ids: torch.Tensor | None = None,
    mode: str = "anaa",
    kernel_size: int | None = None,
) -> torch.Tensor:
    """ANAA attention output.

    Args:
        q, k, v: (batch, heads, seq, head_dim); scores use the scale 1/sqrt(head_dim).
        sigma_eh: event-horizon std of the Gaussian smoothing kernel, in positions.
        variant: "symmetric" (paper, encoders) or "causal" (decoders; no information from later positions).
        training: True adds N(mu, sigma^2) noise; False uses mu (eq. 10).
        attention_mask: (batch, seq) bool, True = valid token.
        noise: explicit standard-normal Z (batch, heads, seq, seq) used instead of the RNG (compare paths exactly).
        seed: seed of the noise RNG (None: draw from torch's global RNG).
        detach_sigma: stop the gradient through sigma (default True).
        sigma_norm: "paper" (eq. 7 literally, / (L - 1)) or "entries" (/ (L^2 - 1)).
        impl: "auto" (triton on CUDA, factorized otherwise), "reference", "factorized", "triton".
        document_ids: (batch, seq) int, packed documents (0 = padding, documents contiguous); every document is
            its own sequence: no attention, noise or smoothing tap crosses a boundary, statistics per document.
        mode: "anaa" (noise + smoothing), "rna" (noise only, the paper's RNA ablation), "smooth" (smoothing only).
        kernel_size: override of the kernel-size rule, in [2, 7].

    Returns:
        (batch, heads, seq, head_dim); zero at padding positions.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be (batch, heads, seq, head_dim) with equal shapes, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if variant not in ("symmetric", "causal"):
        raise ValueError(f"variant must be 'symmetric' or 'causal', got {variant!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if sigma_norm not in ("paper", "entries"):
        raise ValueError(f"sigma_norm must be 'paper' or 'entries', got {sigma_norm!r}")
    B, H, n, _ = q.shape
    if noise is not None and noise.shape != (B, H, n, n):
        raise ValueError(f"noise must be (batch, heads, seq, seq) = {(B, H, n, n)}, got {tuple(noise.shape)}")
    ks = kernel_size if kernel_size is not None else kernel_size_for(sigma_eh)
    taps = gaussian_taps(sigma_eh, ks, variant, dtype=q.dtype, device=q.device)
    doc = document_ids_from(attention_mask, document_ids, B, n, q.device)
    if impl == "auto":
        impl = "triton" if q.is_cuda else "factorized"
    generator = None
    if seed is not None and impl != "triton":
        generator = torch.Generator(device=q.device).manual_seed(int(seed))
    common = dict(
        taps=taps,
        variant=variant,
        mode=mode,
        training=training,
        doc=doc,
        noise=noise,
        detach_sigma=detach_sigma,
        sigma_norm=sigma_norm,
    )
    if impl == "reference":
        from .reference import anaa_reference

        return anaa_reference(q, k, v, generator=generator, **common)
    if impl == "factorized":
        from .factorized import anaa_factorized

        return anaa_factorized(q, k, v, generator=generator, **common)
    from .triton_kernel import anaa_triton

    return anaa_triton(q, k, v, seed=seed, **common)

"""ANAA during finetuning: swap the self-attention of a Llama or BERT backbone for ``anaa_attention``.

    handle = enable_anaa(model, ANAAConfig(sigma_eh=0.33))      # or: with anaa_finetuning(model, cfg): ...
    ...train...  (model.train(): noise N(mu, sigma^2) + smoothing;  model.eval(): deterministic mu term, eq. 10)
    handle.remove()                                              # back to the original attention for export

Mechanism: ANAA is registered in transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``, with
sdpa's boolean masks) under the name ``"ehrfm_anaa"`` and selected with ``model.set_attn_implementation``; no
weights or modules change, so checkpoints stay loadable with any attention implementation. Every attention
module carrying the per-model :class:`ANAAConfig` runs ANAA; other modules (e.g. cross-attention) use sdpa.

Masks: a forward pre-hook on the swapped model records the ``document_ids`` (packed rows) or 2D
``attention_mask`` the model is called with, so ANAA sees documents and padding exactly; if neither keyword is
given, documents and padding are read off the 4D mask the model builds (query i is valid iff it may attend to
itself; a new document starts where position i may not see i - 1).

Choices (documented defaults): ``variant=None`` picks "causal" for causal attention modules (Llama: no
position ever sees the future) and "symmetric" -- the paper's operator -- for bidirectional ones (BERT);
``sigma_norm="paper"``; ``detach_sigma=True``; ``mode="rna"`` gives the paper's noise-only ablation. Attention
dropout is not applied on top of ANAA. Mamba / Mamba2 backbones have no attention and XLNet no attention
function to swap: both are refused. ModernBERT's local layers keep sdpa (ANAA's kernel has no window).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict

import torch

from .config import ANAAConfig

__all__ = ["ANAAConfig", "ANAAHandle", "anaa_finetuning", "enable_anaa"]

ATTN_NAME = "ehrfm_anaa"
_log = logging.getLogger(__name__)


class _State:
    """Per swapped model: the config and the (batch, seq) document ids of the current forward call."""

    def __init__(self, cfg: ANAAConfig):
        self.cfg = cfg
        self.doc: torch.Tensor | None = None


def _names(model) -> list[str]:
    cfg = getattr(model, "config", None)
    return [str(getattr(cfg, "model_type", "")).lower()] + [type(m).__name__.lower() for m in model.modules()]


def _is_mamba(model) -> bool:
    return any("mamba" in name for name in _names(model))


def _is_xlnet(model) -> bool:
    return any("xlnet" in name for name in _names(model))


def _attention_modules(model):
    return [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention")
        and hasattr(m, "is_causal")
        and hasattr(m, "config")
        and not getattr(m, "is_cross_attention", False)
        # ANAA's kernel knows documents, not windows: ModernBERT's local layers keep sdpa with their banded mask
        and getattr(m, "sliding_window", None) is None
    ]


def _docs_from_4d(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, n, n) bool (True = attend) or additive float mask -> (B, n) document ids, 0 = padding."""
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    if allowed.shape[-1] != allowed.shape[-2]:
        raise ValueError("ANAA needs square self-attention masks (no KV cache)")
    valid = torch.diagonal(allowed, dim1=-2, dim2=-1)
    prev_link = torch.diagonal(allowed, offset=-1, dim1=-2, dim2=-1) | torch.diagonal(
        allowed, offset=1, dim1=-2, dim2=-1
    )
    start = valid.clone()
    start[:, 1:] = valid[:, 1:] & ~(prev_link & valid[:, :-1])
    return torch.cumsum(start.long(), dim=1) * valid


def anaa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: query/key/value (B, H, n, d) -> ((B, n, H, d), None)."""
    state: _State | None = getattr(module, "_ehrfm_anaa", None)
    if state is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    from transformers.integrations.sdpa_attention import repeat_kv

    from ehrfm.kernels import anaa_attention

    B, H, n, d = query.shape
    if key.shape[2] != n:
        raise ValueError("ANAA replaces full self-attention; incremental decoding with a KV cache is not supported")
    n_rep = H // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    doc = state.doc
    if doc is None or doc.shape != (B, n):
        doc = _docs_from_4d(attention_mask) if attention_mask is not None else None
    cfg = state.cfg
    variant = cfg.variant or ("causal" if getattr(module, "is_causal", False) else "symmetric")
    if scaling is not None:
        query = query * (scaling * d**0.5)  # anaa_attention scales scores by 1/sqrt(d)
    out = anaa_attention(
        query,
        key,
        value,
        sigma_eh=cfg.sigma_eh,
        variant=variant,
        training=module.training,
        document_ids=doc,
        sigma_norm=cfg.sigma_norm,
        detach_sigma=cfg.detach_sigma,
        impl=cfg.impl,
        mode=cfg.mode,
        kernel_size=cfg.kernel_size,
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"ehrfm_anaa"`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, anaa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


class ANAAHandle:
    """Returned by :func:`enable_anaa`; ``remove()`` restores the original attention implementation."""

    def __init__(self, model, previous_impl: str, modules, hooks):
        self.model, self.previous_impl, self.modules, self.hooks = model, previous_impl, modules, hooks

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for m in self.modules:
            if hasattr(m, "_ehrfm_anaa"):
                del m._ehrfm_anaa
        self.model.set_attn_implementation(self.previous_impl)


def enable_anaa(model, cfg: ANAAConfig | None = None) -> ANAAHandle:
    """Make every self-attention module of ``model`` (an HF Llama / BERT style model) run ANAA.

    Raises FinetuneInputError for Mamba and XLNet backbones (no attention function to swap), ValueError for models
    without attention modules. ModernBERT: its global layers run ANAA, its local (windowed) layers keep sdpa.
    """
    cfg = cfg or ANAAConfig()
    if _is_mamba(model):
        from .data import FinetuneInputError

        raise FinetuneInputError(
            "ANAA (--anaa) perturbs self-attention weights, but this is a Mamba/Mamba2 backbone "
            "which has no attention; finetune it without --anaa (use a Llama or BERT backbone for ANAA)."
        )
    if _is_xlnet(model):
        from .data import FinetuneInputError

        raise FinetuneInputError(
            "ANAA (--anaa) swaps the attention function, but XLNet has no attention function to swap (its "
            "two-stream relative attention is inline); finetune it without --anaa (or use a Llama, BERT or "
            "ModernBERT backbone)."
        )
    modules = _attention_modules(model)
    if any(hasattr(m, "_ehrfm_anaa") for m in modules):
        raise ValueError("ANAA is already enabled on this model (call handle.remove() first)")
    if not modules:
        raise ValueError(f"ANAA found no self-attention modules in {type(model).__name__}")
    if cfg.variant == "symmetric" and any(getattr(m, "is_causal", False) for m in modules):
        _log.warning("symmetric ANAA on a causal model: smoothing and noise let positions see later tokens")
    register()
    previous = model.config._attn_implementation or "sdpa"
    state = _State(cfg)
    for m in modules:
        m._ehrfm_anaa = state

    def capture(_mod, args, kwargs):
        doc = kwargs.get("document_ids")
        if doc is None:
            am = kwargs.get("attention_mask")
            doc = (am != 0).long() if am is not None and am.dim() == 2 else None
        state.doc = doc

    def release(_mod, args, kwargs, output):
        state.doc = None

    hooks = [
        model.register_forward_pre_hook(capture, with_kwargs=True),
        model.register_forward_hook(release, with_kwargs=True),
    ]
    model.set_attn_implementation(ATTN_NAME)
    _log.info("ANAA enabled on %d attention modules: %s", len(modules), asdict(cfg))
    return ANAAHandle(model, previous, modules, hooks)


@contextlib.contextmanager
def anaa_finetuning(model, cfg: ANAAConfig | None = None):
    """``with anaa_finetuning(model, cfg): train(...)`` -- ANAA inside the block only."""
    handle = enable_anaa(model, cfg)
    try:
        yield handle
    finally:
        handle.remove()

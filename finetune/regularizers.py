"""Finetuning-time regularizers attached to a backbone: NEFTune (noisy embeddings, Jain et al. 2023; the
baseline of 000 Table 3, alpha 5 / 10) and ANAA (:mod:`ehrfm.finetune.anaa`; paper 000).

    regs = attach_regularizers(backbone, neftune_alpha=5.0, anaa=ANAAConfig())
    ... train ...           # NEFTune is active only in training mode; ANAA: noise in training, eq. 10 in eval
    regs.remove()           # original embeddings / attention again (before saving)

NEFTune adds uniform(-1, 1) * alpha / sqrt(L * d) noise to the concept embeddings of real tokens, L = the
row's number of real tokens (padding, id 0, gets none), d = hidden size.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("ehrfm.finetune")


def hf_model(backbone):
    """The underlying transformers model of a (possibly peft-wrapped) backbone."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def neftune_hook(alpha: float, padding_idx: int = 0):
    """Forward hook for an embedding module: noisy outputs in training mode (see the module docstring)."""

    def hook(module, args, output):
        if not module.training or alpha <= 0:
            return output
        ids = args[0]
        real = (ids != padding_idx).to(output.dtype)[..., None]  # (B, L, 1)
        length = real.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1, 1)
        scale = alpha / torch.sqrt(length * output.shape[-1])
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * scale * real

    return hook


class Regularizers:
    """Handles of the active regularizers; ``remove()`` restores the plain backbone (idempotent)."""

    def __init__(self, neftune_handle=None, anaa_handle=None):
        self.neftune_handle, self.anaa_handle = neftune_handle, anaa_handle

    @property
    def anaa_active(self) -> bool:
        return self.anaa_handle is not None

    def remove(self) -> None:
        if self.neftune_handle is not None:
            self.neftune_handle.remove()
            self.neftune_handle = None
        if self.anaa_handle is not None:
            self.anaa_handle.remove()
            self.anaa_handle = None


def attach_regularizers(backbone, neftune_alpha: float = 0.0, anaa=None) -> Regularizers:
    """Attach NEFTune (alpha > 0) and/or ANAA (an ``ANAAConfig``) to ``backbone``; ANAA refuses Mamba."""
    model = hf_model(backbone)
    neft = None
    if neftune_alpha > 0:
        embedding = model.get_input_embeddings()
        neft = embedding.register_forward_hook(neftune_hook(neftune_alpha, embedding.padding_idx or 0))
        log.info("NEFTune on %s, alpha %.1f", type(model).__name__, neftune_alpha)
    anaa_handle = None
    if anaa is not None:
        from .anaa import enable_anaa

        try:
            anaa_handle = enable_anaa(model, anaa)
        except Exception:
            if neft is not None:
                neft.remove()
            raise
    return Regularizers(neft, anaa_handle)

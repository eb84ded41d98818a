"""EHR BigBird: HF BigBird encoder (block-sparse attention) over EHR embeddings, MLM; 001's BigBird baseline
(and MultiBird: the same model finetuned with MPF).

Weight names equal HF ``BigBirdModel`` / ``BigBirdForMaskedLM`` (bert.embeddings.*, bert.encoder.*,
cls.predictions.*) plus the EHR attribute embeddings under bert.embeddings.*; the embeddings, forward and MLM
loss are those of ``bert.py``, only the encoder differs.

Which attention runs:
  * block sparse (HF ``BigBirdBlockSparseAttention``: 3 sliding, 2 global and ``num_random_blocks`` random
    key blocks per query block) on unpacked rows longer than ``(5 + 2 * num_random_blocks) * block_size``
    tokens, when ``config.attention_type == "block_sparse"``. Rows are padded to a multiple of block_size
    internally (padding is masked and cut off again). This is HF's own rule: below that length block sparse
    would attend to (almost) everything, and HF switches to full attention too.
  * full attention otherwise, with ehrfm's mask: padding masked, and in a packed row each document attends
    only to itself. Block-sparse attention takes one key mask per row and cannot isolate packed documents, so
    packed rows always run full attention (exact, but quadratic in the row length): pretrain with
    ``data.mode=padded`` to train the block-sparse attention of 001's configuration.
Random blocks: HF draws them from numpy's global RNG seeded with the layer index in training (the same
pattern every step) and uses none (all-zero block lists) in eval, so eval is deterministic; the numpy RNG
state is restored after every forward, so the data pipeline's numpy draws are not reset.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import initialization as init
from transformers.models.big_bird.modeling_big_bird import (
    BigBirdEncoder,
    BigBirdLMPredictionHead,
    BigBirdModel,
    BigBirdOnlyMLMHead,
)

from .bert import EhrBertForMaskedLM, EhrBertModel
from .configuration import EhrBigBirdConfig
from .masking import packed_attention_mask


def block_sparse_min_length(config) -> int:
    """Rows of at most this many tokens run full attention (HF BigBird's rule)."""
    return (5 + 2 * config.num_random_blocks) * config.block_size


def _init_bigbird_weights(model, module) -> None:
    """BERT's init (inherited) plus BigBird's one addition for our modules: a zero MLM-head bias."""
    EhrBertModel._init_weights(model, module)
    if isinstance(module, BigBirdLMPredictionHead):
        init.zeros_(module.bias)


class EhrBigBirdModel(EhrBertModel):
    """Batch dict in, last encoder states (B, L, H) out (``BaseModelOutput``); see the module docstring."""

    config_class = EhrBigBirdConfig
    config: EhrBigBirdConfig
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    encoder_class = BigBirdEncoder

    @torch.no_grad()
    def _init_weights(self, module):
        _init_bigbird_weights(self, module)

    def uses_block_sparse(self, length: int, packed: bool) -> bool:
        """Whether a (B, length) batch runs block-sparse attention."""
        return (
            self.config.attention_type == "block_sparse"
            and not packed
            and length > block_sparse_min_length(self.config)
        )

    def _run_encoder(self, hidden, documents, position_ids, packed: bool, **kwargs) -> torch.Tensor:
        length = documents.shape[1]
        sparse = self.uses_block_sparse(length, packed)
        self.encoder.set_attention_type("block_sparse" if sparse else "original_full")
        if not sparse:
            mask = packed_attention_mask(documents, causal=False, dtype=hidden.dtype, attn_implementation="eager")
            return self.encoder(hidden, attention_mask=mask, **kwargs).last_hidden_state
        pad = (-length) % self.config.block_size
        keep = F.pad(documents != 0, (0, pad)).to(hidden.dtype)
        blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
            keep, self.config.block_size
        )
        numpy_state = np.random.get_state()
        try:
            out = self.encoder(
                F.pad(hidden, (0, 0, 0, pad)),
                band_mask=band,
                from_mask=from_mask,
                to_mask=to_mask,
                blocked_encoder_mask=blocked,
                **kwargs,
            ).last_hidden_state
        finally:
            np.random.set_state(numpy_state)
        return out[:, :length]


class EhrBigBirdForMaskedLM(EhrBertForMaskedLM):
    """Masked language modeling over ``EhrBigBirdModel``: HF ``BigBirdOnlyMLMHead``, decoder tied to the word
    embeddings (``BigBirdForMaskedLM``'s layout)."""

    config_class = EhrBigBirdConfig
    config: EhrBigBirdConfig
    backbone_class = EhrBigBirdModel
    mlm_head_class = BigBirdOnlyMLMHead
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        _init_bigbird_weights(self, module)

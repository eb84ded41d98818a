"""EHR ModernBERT: HF ModernBERT layers (RoPE, GeGLU, pre-LayerNorm without biases; global attention every third
layer, a local window otherwise) over EHR embeddings, MLM (003 Table 2 and B.1, "MBERT").

Weight names equal HF ``ModernBertModel`` / ``ModernBertForMaskedLM`` (model.embeddings.{tok_embeddings,norm},
model.layers.*, model.final_norm, head.*, decoder) plus ``model.ehr_embeddings.*``. The EHR embedding sum is
normalized by ModernBERT's own embedding norm (no second LayerNorm). Packed rows get block-diagonal masks (the
local layers' mask also holds the window, |i - j| <= local_attention // 2 as in HF) and RoPE positions restarting
per document; with flash-attn the rows are flattened into one varlen sequence and the layers pass the window.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.models.modernbert.modeling_modernbert import (
    ModernBertEmbeddings,
    ModernBertEncoderLayer,
    ModernBertPredictionHead,
    ModernBertPreTrainedModel,
    ModernBertRotaryEmbedding,
)

from .common import ATTRIBUTE_STREAMS, EhrModelMixin, embed_inputs, masked_lm_loss
from .configuration import EhrModernBertConfig
from .embeddings import EhrEmbeddings, init_ehr_embedding_weights
from .masking import (
    flash_varlen_kwargs,
    packed_attention_mask,
    position_ids_per_document,
    resolve_document_ids,
    uses_flash_attention,
)


class EhrModernBertPreTrainedModel(ModernBertPreTrainedModel):
    config_class = EhrModernBertConfig
    config: EhrModernBertConfig
    _can_record_outputs = {}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_ehr_embedding_weights(module)
        if isinstance(module, EhrModernBertForMaskedLM):  # as HF's ModernBertForMaskedLM's decoder
            std = self.config.initializer_range / math.sqrt(2.0 * self.config.num_hidden_layers)
            cutoff = (self.config.initializer_cutoff_factor or 3) * std
            init.trunc_normal_(module.decoder.weight, mean=0.0, std=std, a=-cutoff, b=cutoff)
            if module.decoder.bias is not None:
                init.zeros_(module.decoder.bias)


class EhrModernBertModel(EhrModelMixin, EhrModernBertPreTrainedModel):
    """Batch dict in, final-norm states (B, L, H) out (``BaseModelOutput``)."""

    default_pooling = "first"  # as ehrfm's BERT and HF's classifier_pooling "cls"

    def __init__(self, config: EhrModernBertConfig):
        super().__init__(config)
        self.embeddings = ModernBertEmbeddings(config)
        self.ehr_embeddings = EhrEmbeddings(config, use_position_embeddings=False, normalize=False)
        self.layers = nn.ModuleList([ModernBertEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.rotary_emb = ModernBertRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.tok_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.tok_embeddings = value

    def attention_masks(self, documents: torch.Tensor, dtype: torch.dtype) -> dict:
        """{layer type: (B, 1, L, L) mask} for sdpa / eager / flex: block-diagonal, windowed for local layers."""
        implementation = self.config._attn_implementation
        return {
            "full_attention": packed_attention_mask(
                documents, causal=False, dtype=dtype, attn_implementation=implementation
            ),
            "sliding_attention": packed_attention_mask(
                documents,
                causal=False,
                dtype=dtype,
                attn_implementation=implementation,
                window=self.config.sliding_window,
            ),
        }

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Streams (B, L) as ``schema.BATCH_KEYS``; ``document_ids`` marks packed documents, otherwise
        ``attention_mask`` marks padding. RoPE positions restart per document when not given. Other keyword
        arguments go to the attention layers."""
        streams = {k: kwargs.pop(k) for k in ATTRIBUTE_STREAMS if k in kwargs}
        raw = embed_inputs(self.embeddings.tok_embeddings, self.ehr_embeddings, input_ids, inputs_embeds, streams)
        batch, length = raw.shape[:2]
        hidden = self.embeddings(inputs_embeds=raw)  # ModernBERT's norm + dropout
        documents = resolve_document_ids(document_ids, attention_mask, (batch, length), raw.device)
        if position_ids is None:
            position_ids = position_ids_per_document(documents)
        if uses_flash_attention(self.config):
            hidden = hidden.reshape(1, batch * length, -1)
            position_ids = position_ids.reshape(1, batch * length)
            kwargs.update(flash_varlen_kwargs(position_ids))
            masks: dict = {"full_attention": None, "sliding_attention": None}
        else:
            masks = self.attention_masks(documents, hidden.dtype)
        rope = {kind: self.rotary_emb(hidden, position_ids, kind) for kind in set(self.config.layer_types)}
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=masks[layer.attention_type],
                position_embeddings=rope[layer.attention_type],
                **kwargs,
            )
        hidden = self.final_norm(hidden)
        return BaseModelOutput(last_hidden_state=hidden.reshape(batch, length, -1))

    def _encode(self, **batch) -> torch.Tensor:
        return self(**batch).last_hidden_state


class EhrModernBertForMaskedLM(EhrModelMixin, EhrModernBertPreTrainedModel):
    """Masked language modeling (0.15, 003 P:98): ModernBERT's prediction head and decoder (tied to the word
    embeddings). Dense logits over every position; ``labels`` (B, L) hold the masked ids and -100 elsewhere."""

    default_pooling = "first"
    _tied_weights_keys = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

    def __init__(self, config: EhrModernBertConfig):
        super().__init__(config)
        self.model = EhrModernBertModel(config)
        self.head = ModernBertPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.post_init()

    def get_output_embeddings(self):
        return self.decoder

    def set_output_embeddings(self, new_embeddings):
        self.decoder = new_embeddings

    def forward(self, labels: torch.LongTensor | None = None, **batch) -> MaskedLMOutput:
        """Batch dict in (``EhrModernBertModel.forward``); logits (B, L, V) and the mean fp32 MLM loss."""
        logits = self.decoder(self.head(self.model(**batch).last_hidden_state))
        loss = masked_lm_loss(logits, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits)

    def _encode(self, **batch) -> torch.Tensor:
        return self.model._encode(**batch)

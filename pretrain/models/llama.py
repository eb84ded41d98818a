"""EHR Llama: HF Llama decoder layers (RoPE, SwiGLU, RMSNorm pre-norm) over EHR embeddings, causal NTP.

Weight names equal HF ``LlamaModel`` / ``LlamaForCausalLM`` (model.embed_tokens, model.layers.*, model.norm,
lm_head) plus ``model.ehr_embeddings.*``. Packed rows get a block-diagonal causal mask and RoPE positions
restarting per document; with flash-attn the rows are flattened into one varlen sequence instead.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .common import EhrModelMixin, StreamGenerationMixin, next_token_loss
from .configuration import EhrLlamaConfig
from .embeddings import EhrEmbeddings, init_ehr_embedding_weights
from .hf_cache_compat import kv_cache_kwargs, output_cache, resolve_cache
from .masking import (
    flash_varlen_kwargs,
    packed_attention_mask,
    position_ids_per_document,
    resolve_document_ids,
    rows_are_right_padded,
    uses_flash_attention,
)


class EhrLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = EhrLlamaConfig
    config: EhrLlamaConfig
    _can_record_outputs = {}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_ehr_embedding_weights(module)


class EhrLlamaModel(EhrModelMixin, EhrLlamaPreTrainedModel):
    """Batch dict in, last hidden states (B, L, H) out (``BaseModelOutputWithPast``)."""

    def __init__(self, config: EhrLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.ehr_embeddings = EhrEmbeddings(config, use_position_embeddings=False)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        type_ids: torch.LongTensor | None = None,
        ages: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        visit_segments: torch.LongTensor | None = None,
        visit_orders: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """All streams (B, L); see ``schema.BATCH_KEYS``. ``document_ids`` marks packed documents; without it a
        row is one document and ``attention_mask`` (B, L) marks padding. ``inputs_embeds`` replaces the concept
        embedding lookup (B, L, H)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        concept = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = concept.shape[:2]
        hidden = self.ehr_embeddings(concept, type_ids, ages, times, visit_segments, visit_orders)
        past_key_values = resolve_cache(cache, past_key_values, kwargs)  # one name inside, HF's name outside
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        flat = False
        if past_length == 0:
            documents = resolve_document_ids(document_ids, attention_mask, (batch, length), concept.device)
            if position_ids is None:
                position_ids = position_ids_per_document(documents)
            if uses_flash_attention(self.config) and past_key_values is None:
                # one varlen row: every (document, row) pair is its own sequence via restarting positions
                flat = True
                hidden = hidden.reshape(1, batch * length, -1)
                position_ids = position_ids.reshape(1, batch * length)
                kwargs.update(flash_varlen_kwargs(position_ids))
                mask = None
            elif uses_flash_attention(self.config):  # generation prefill: unpacked rows, HF unpads a 2D mask
                if document_ids is not None:
                    raise ValueError("cached decoding does not support packed rows (document_ids)")
                mask = attention_mask
            elif (
                document_ids is None
                and self.config._attn_implementation == "sdpa"
                and rows_are_right_padded(attention_mask)
            ):
                mask = None  # one document per row, padding at the end: SDPA's causal kernel, no dense mask
            else:
                mask = packed_attention_mask(
                    documents, causal=True, dtype=hidden.dtype, attn_implementation=self.config._attn_implementation
                )
        else:  # cached decoding: unpacked rows, HF's mask over the cache
            if document_ids is not None:
                raise ValueError("cached decoding does not support packed rows (document_ids)")
            if position_ids is None:
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
                else:
                    position_ids = torch.arange(past_length, past_length + length, device=hidden.device)[None]
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **kv_cache_kwargs(past_key_values),
            )

        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **kv_cache_kwargs(past_key_values),
                **kwargs,
            )
        hidden = self.norm(hidden)
        if flat:
            hidden = hidden.reshape(batch, length, -1)
        return BaseModelOutputWithPast(last_hidden_state=hidden, **kv_cache_kwargs(past_key_values))

    def _encode(self, **batch) -> torch.Tensor:
        return self(**batch, use_cache=False).last_hidden_state


class EhrLlamaForCausalLM(EhrModelMixin, StreamGenerationMixin, EhrLlamaPreTrainedModel, GenerationMixin):
    """Next-token prediction (EHR forecasting, 001 3.2.3): LM head over the final RMSNorm states."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EhrLlamaConfig):
        super().__init__(config)
        self.model = EhrLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        type_ids: torch.LongTensor | None = None,
        ages: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        visit_segments: torch.LongTensor | None = None,
        visit_orders: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Batch dict in (streams as in ``EhrLlamaModel.forward``); ``labels`` (B, L) are the targets aligned
        with input_ids (shifted inside, -100 = ignored). Returns logits (B, L, V) and the mean NTP loss."""
        out = self.model(
            input_ids=input_ids,
            type_ids=type_ids,
            ages=ages,
            times=times,
            visit_segments=visit_segments,
            visit_orders=visit_orders,
            position_ids=position_ids,
            attention_mask=attention_mask,
            document_ids=document_ids,
            cache=resolve_cache(cache, past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = next_token_loss(logits, labels, document_ids) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, **kv_cache_kwargs(output_cache(out)))

    def _encode(self, **batch) -> torch.Tensor:
        return self.model._encode(**batch)

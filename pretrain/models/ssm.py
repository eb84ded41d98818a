"""What EHR Mamba and EHR Mamba2 share: the document-aware causal convolution, padding masks, and one generic
residual block, backbone and causal LM over HF's Mamba / Mamba2 classes.

A concrete backbone names its parts as class attributes and inherits everything else:

    class EhrMambaBlock(EhrSsmBlockMixin, MambaBlock):           mixer_class = EhrMambaMixer
    class EhrMambaModel(EhrSsmModelMixin, EhrMambaPreTrainedModel):  block_class, norm_class, output_class
    class EhrMambaForCausalLM(EhrSsmForCausalLMMixin, EhrMambaPreTrainedModel, GenerationMixin):
                                                                 backbone_class, output_class

Weight names equal HF's (backbone.embeddings, backbone.layers.*.mixer.*, backbone.norm_f, lm_head) plus
``backbone.ehr_embeddings.*``. The mixers themselves live in ``mamba.py`` / ``mamba2.py``: their
full-sequence forward runs the scans of ``ehrfm.kernels.mamba_scan`` with document resets; cached generation
(prefill and decoding) keeps HF's own path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from .common import EhrModelMixin, StreamGenerationMixin, next_token_loss
from .embeddings import EhrEmbeddings
from .hf_cache_compat import cache_kwargs, output_cache, resolve_cache
from .masking import same_document_as_previous


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, document_ids: torch.Tensor | None
) -> torch.Tensor:
    """Causal depthwise conv1d. x (B, C, L); weight (C, 1, K) as in ``nn.Conv1d``; document_ids (B, L) or
    None. Output t sums taps x[t - k] * weight[:, 0, K-1-k] over k < K, keeping only taps of t's document."""
    kernel, length = weight.shape[-1], x.shape[-1]
    if document_ids is None:
        return F.conv1d(x, weight, bias, padding=kernel - 1, groups=x.shape[1])[..., :length]
    out = x * weight[None, :, 0, kernel - 1, None]
    for k in range(1, kernel):
        tap = F.pad(x, (k, 0))[..., :length] * same_document_as_previous(document_ids, k)[:, None, :]
        out = out + tap * weight[None, :, 0, kernel - 1 - k, None]
    return out + bias[None, :, None] if bias is not None else out


def mask_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padding tokens of (B, L, C) states (HF does the same so padding never feeds the state)."""
    if attention_mask is None:
        return hidden_states
    return hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)


class EhrSsmBlockMixin:
    """Pre-RMSNorm residual block around ``mixer_class`` (HF's block supplies norm and residual_in_fp32)."""

    mixer_class: type[nn.Module]

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.mixer = self.mixer_class(config, layer_idx=layer_idx, initialize_mixer_weights=False)

    def forward(self, hidden_states, cache=None, attention_mask=None, document_ids=None, cache_params=None, **kwargs):
        """hidden_states (B, L, H) -> (B, L, H); attention_mask (B, L) 0 = padding; document_ids (B, L) or None."""
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(
            hidden_states,
            cache=resolve_cache(cache, cache_params, kwargs),
            attention_mask=attention_mask,
            document_ids=document_ids,
        )
        return residual + hidden_states


class EhrSsmModelMixin(EhrModelMixin):
    """Batch dict in, final RMSNorm states (B, L, H) out (``output_class``). No positions: order is implicit."""

    block_class: type[nn.Module]
    norm_class: type[nn.Module]
    output_class: type

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.ehr_embeddings = EhrEmbeddings(config, use_position_embeddings=False)
        self.layers = nn.ModuleList([self.block_class(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = self.norm_class(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        type_ids: torch.LongTensor | None = None,
        ages: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        visit_segments: torch.LongTensor | None = None,
        visit_orders: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,  # accepted for the shared batch contract; unused
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_params=None,
        **kwargs,
    ):
        """All streams (B, L) (``schema.BATCH_KEYS``); document_ids marks packed documents."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        concept = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        hidden = self.ehr_embeddings(concept, type_ids, ages, times, visit_segments, visit_orders)
        # a cache only when asked for (generate() asks): training and scoring use the fast full-sequence path
        use_cache = bool(use_cache) and not (self.gradient_checkpointing and self.training)
        cache = resolve_cache(cache, cache_params, kwargs)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and document_ids is not None:
            raise ValueError("cached generation does not support packed rows (document_ids)")
        for layer in self.layers:
            hidden = layer(hidden, cache=cache, attention_mask=attention_mask, document_ids=document_ids)
        hidden = self.norm_f(hidden)
        return self.output_class(last_hidden_state=hidden, **cache_kwargs(cache if use_cache else None))

    def _encode(self, **batch) -> torch.Tensor:
        return self(**batch, use_cache=False).last_hidden_state


class EhrSsmForCausalLMMixin(EhrModelMixin, StreamGenerationMixin):
    """Next-token prediction (EHR forecasting head, 001 3.2.3) over the final RMSNorm states of
    ``backbone_class``; the LM head is tied to the input embeddings."""

    backbone_class: type[nn.Module]
    output_class: type
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.backbone = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        return self.backbone.set_input_embeddings(value)

    def prepare_inputs_for_generation(self, input_ids, use_cache=None, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, use_cache=use_cache, is_first_iteration=is_first_iteration, **kwargs
        )
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None  # the recurrent state already absorbed the padding
        return model_inputs

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
        cache_params=None,
        **kwargs,
    ):
        """Batch dict in (streams as in the backbone's forward); labels (B, L) aligned with input_ids (shifted
        inside, -100 ignored). Returns logits (B, L, V) and the mean NTP loss (``output_class``)."""
        out = self.backbone(
            input_ids=input_ids,
            type_ids=type_ids,
            ages=ages,
            times=times,
            visit_segments=visit_segments,
            visit_orders=visit_orders,
            attention_mask=attention_mask,
            document_ids=document_ids,
            cache=resolve_cache(cache, cache_params, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        loss = next_token_loss(logits, labels, document_ids) if labels is not None else None
        return self.output_class(loss=loss, logits=logits, **cache_kwargs(output_cache(out)))

    def _encode(self, **batch) -> torch.Tensor:
        return self.backbone._encode(**batch)

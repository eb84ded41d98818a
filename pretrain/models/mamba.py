"""EHR Mamba (v1): HF Mamba blocks (001 C.1) over EHR embeddings, causal NTP (EhrMamba, 001 3.2).

Weight names equal HF ``MambaModel`` / ``MambaForCausalLM`` (backbone.embeddings, backbone.layers.*.mixer.*,
backbone.norm_f, lm_head) plus ``backbone.ehr_embeddings.*``. The mixer's full-sequence path runs the fast
selective scan of ``ehrfm.kernels.mamba_scan`` (mamba_ssm's CUDA kernel when installed) instead of HF's
sequential fallback; packed rows reset the SSM state at document starts and the causal convolution does not
read across documents. Cached generation (prefill and decoding) keeps HF's own path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache
from transformers.models.mamba.modeling_mamba import (
    MambaBlock,
    MambaCausalLMOutput,
    MambaMixer,
    MambaOutput,
    MambaPreTrainedModel,
    MambaRMSNorm,
)

from ...kernels.mamba_scan import selective_scan
from .common import EhrModelMixin, StreamGenerationMixin, next_token_loss
from .configuration import EhrMambaConfig
from .embeddings import EhrEmbeddings, init_ehr_embedding_weights
from .hf_cache_compat import cache_kwargs, output_cache, resolve_cache
from .masking import document_starts, same_document_as_previous


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


def _mask_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padding tokens of (B, L, C) states (HF does the same so padding never feeds the state)."""
    if attention_mask is None:
        return hidden_states
    return hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)


class EhrMambaMixer(MambaMixer):
    """HF ``MambaMixer`` parameters; full-sequence forward through ``selective_scan`` with document resets."""

    def forward(self, hidden_states, cache=None, attention_mask=None, document_ids=None, cache_params=None, **kwargs):
        """hidden_states (B, L, H) -> (B, L, H). attention_mask (B, L) 0 = padding; document_ids (B, L) for packed
        rows (None: one document per row)."""
        cache = resolve_cache(cache, cache_params, kwargs)
        if cache is not None:
            return super().forward(hidden_states, **cache_kwargs(cache), attention_mask=attention_mask)
        dtype = hidden_states.dtype
        projected = self.in_proj(_mask_padding(hidden_states, attention_mask)).transpose(1, 2)
        x, gate = projected.chunk(2, dim=1)  # (B, I, L) each
        x = self.act(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias, document_ids))
        x = _mask_padding(x.transpose(1, 2), attention_mask)  # (B, L, I)
        time_step, B, C = torch.split(
            self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
        )
        delta = self.dt_proj.weight @ time_step.transpose(1, 2)  # (B, I, L); bias added inside the scan
        y = selective_scan(
            x.transpose(1, 2),
            delta,
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=self.D,
            z=gate,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            resets=document_starts(document_ids) if document_ids is not None else None,
        )
        return self.out_proj(y.transpose(1, 2).to(dtype))


class EhrMambaBlock(MambaBlock):
    """Pre-RMSNorm residual block around ``EhrMambaMixer``."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.mixer = EhrMambaMixer(config, layer_idx=layer_idx, initialize_mixer_weights=False)

    def forward(self, hidden_states, cache=None, attention_mask=None, document_ids=None, cache_params=None, **kwargs):
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


class EhrMambaPreTrainedModel(MambaPreTrainedModel):
    config_class = EhrMambaConfig
    config: EhrMambaConfig

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_ehr_embedding_weights(module)


class EhrMambaModel(EhrModelMixin, EhrMambaPreTrainedModel):
    """Batch dict in, final RMSNorm states (B, L, H) out (``MambaOutput``). No positions: order is implicit."""

    def __init__(self, config: EhrMambaConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.ehr_embeddings = EhrEmbeddings(config, use_position_embeddings=False)
        self.layers = nn.ModuleList([EhrMambaBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
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
    ) -> MambaOutput:
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
        return MambaOutput(last_hidden_state=hidden, **cache_kwargs(cache if use_cache else None))

    def _encode(self, **batch) -> torch.Tensor:
        return self(**batch, use_cache=False).last_hidden_state


class EhrMambaForCausalLM(EhrModelMixin, StreamGenerationMixin, EhrMambaPreTrainedModel, GenerationMixin):
    """Next-token prediction (EHR forecasting head, 001 3.2.3) over the final RMSNorm states."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: EhrMambaConfig):
        super().__init__(config)
        self.backbone = EhrMambaModel(config)
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
    ) -> MambaCausalLMOutput:
        """Batch dict in (streams as in ``EhrMambaModel.forward``); labels (B, L) aligned with input_ids
        (shifted inside, -100 ignored). Returns logits (B, L, V) and the mean NTP loss."""
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
        return MambaCausalLMOutput(loss=loss, logits=logits, **cache_kwargs(output_cache(out)))

    def _encode(self, **batch) -> torch.Tensor:
        return self.backbone._encode(**batch)

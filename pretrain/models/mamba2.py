"""EHR Mamba2: HF Mamba2 blocks (SSD, scalar A per head, gated RMSNorm) over EHR embeddings, causal NTP.

Weight names equal HF ``Mamba2Model`` / ``Mamba2ForCausalLM`` (backbone.embeddings, backbone.layers.*.mixer.*,
backbone.norm_f, lm_head) plus ``backbone.ehr_embeddings.*``. Packed rows: the causal convolution does not
read across documents and the SSD scan resets its state at document starts, via ``seq_idx`` in mamba_ssm's
kernel when installed (CUDA) and in the pure-torch chunked scan below otherwise. Cached generation keeps
HF's own path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache
from transformers.models.mamba2.modeling_mamba2 import (
    Mamba2Block,
    Mamba2CausalLMOutput,
    Mamba2Mixer,
    Mamba2Output,
    Mamba2PreTrainedModel,
    Mamba2RMSNorm,
    segment_sum,
)

from ...kernels.mamba_scan import fp32_region
from .common import EhrModelMixin, StreamGenerationMixin, next_token_loss
from .configuration import EhrMamba2Config
from .embeddings import EhrEmbeddings, init_ehr_embedding_weights
from .hf_cache_compat import cache_kwargs, output_cache, resolve_cache
from .mamba import _mask_padding, causal_depthwise_conv
from .masking import document_starts

try:  # optional CUDA kernel, the `[gpu]` extra
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mamba_ssm_chunk_scan
except Exception:  # noqa: BLE001 - absent or incompatible: pure-torch scan
    _mamba_ssm_chunk_scan = None


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    resets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked SSD scan (Mamba2, softplus time steps) in float32 with optional document resets.

    x (b, l, heads, head_dim); dt (b, l, heads) raw (bias and softplus applied here); A (heads,) negative;
    B, C (b, l, groups, state); D, dt_bias (heads,); resets (b, l) bool, True at document starts.
    Returns y (b, l, heads, head_dim) float32.

    A reset at step t sets log-decay dt_t * A to -inf: every decay factor spanning t becomes exactly 0. Decays
    are read from segment sums / cumulative sums only (never differences of cumsums, which would give
    inf - inf), so the result stays finite and equals running each document alone. Autocast is disabled inside
    (under bf16 autocast the einsums would otherwise run in bf16).
    """
    with fp32_region(x.device.type):
        return _ssd_chunk_scan_fp32(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, resets)


def _ssd_chunk_scan_fp32(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, resets):
    batch, length, heads, head_dim = x.shape
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    dt = F.softplus(dt).clamp(dt_limit[0], dt_limit[1])
    x = x.float()
    B = B.float().repeat_interleave(heads // B.shape[2], dim=2)
    C = C.float().repeat_interleave(heads // C.shape[2], dim=2)
    log_decay = A.float()[None, None] * dt  # (b, l, h)
    if resets is not None:
        log_decay = log_decay.masked_fill(resets[..., None], float("-inf"))
    pad = (-length) % chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, -1, chunk_size, *t.shape[2:])

    xdt, Bc, Cc = chunks(x * dt[..., None]), chunks(B), chunks(C)  # (b, c, s, h, .)
    log_decay = chunks(log_decay).permute(0, 3, 1, 2)  # (b, h, c, s)
    decay = torch.exp(segment_sum(log_decay))  # (b, h, c, s_to, s_from)
    # within a chunk: y_l = sum_{s <= l} (C_l . B_s) decay(s -> l) dt_s x_s
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # state at each chunk end from that chunk's tokens; decay(s -> chunk end) is the last row of `decay`
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bc, decay[..., -1, :], xdt)
    cum_decay = torch.exp(torch.cumsum(log_decay, dim=-1))  # decay(chunk start -> l), (b, h, c, s)
    chunk_decay = cum_decay[..., -1]  # (b, h, c)
    carried, state = [], torch.zeros_like(chunk_states[:, 0])
    for c in range(chunk_states.shape[1]):
        carried.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    carried = torch.stack(carried, dim=1)  # state entering each chunk, (b, c, h, p, n)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, carried, cum_decay)
    y = y.reshape(batch, -1, heads, head_dim)[:, :length]
    if D is not None:
        y = y + x * D.float()[:, None]
    return y


class EhrMamba2Mixer(Mamba2Mixer):
    """HF ``Mamba2Mixer`` parameters; full-sequence forward with document-aware conv and SSD scan."""

    def forward(self, hidden_states, cache=None, attention_mask=None, document_ids=None, cache_params=None, **kwargs):
        """hidden_states (B, L, H) -> (B, L, H); attention_mask (B, L) 0 = padding; document_ids (B, L) or None."""
        cache = resolve_cache(cache, cache_params, kwargs)
        if cache is not None:
            return super().forward(hidden_states, **cache_kwargs(cache), attention_mask=attention_mask)
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        projected = self.in_proj(_mask_padding(hidden_states, attention_mask))
        gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        xBC = self.act(causal_depthwise_conv(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, document_ids))
        xBC = _mask_padding(xBC.transpose(1, 2), attention_mask)
        groups_state = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, groups_state, groups_state], dim=-1)
        x = x.reshape(batch, length, self.num_heads, self.head_dim)
        B = B.reshape(batch, length, self.n_groups, self.ssm_state_size)
        C = C.reshape(batch, length, self.n_groups, self.ssm_state_size)
        A = -torch.exp(self.A_log.float())
        if _mamba_ssm_chunk_scan is not None and x.is_cuda:
            seq_idx = None
            if document_ids is not None:
                seq_idx = document_starts(document_ids).cumsum(-1).to(torch.int32)
            y = _mamba_ssm_chunk_scan(
                x,
                dt,
                A,
                B,
                C,
                self.chunk_size,
                D=self.D,
                dt_bias=self.dt_bias,
                seq_idx=seq_idx,
                dt_softplus=True,
                dt_limit=tuple(self.time_step_limit),
            )
        else:
            resets = document_starts(document_ids) if document_ids is not None else None
            y = ssd_chunk_scan(
                x,
                dt,
                A,
                B,
                C,
                self.chunk_size,
                D=self.D,
                dt_bias=self.dt_bias,
                dt_limit=tuple(self.time_step_limit),
                resets=resets,
            )
        y = self.norm(y.reshape(batch, length, -1), gate)
        return self.out_proj(y.to(dtype))


class EhrMamba2Block(Mamba2Block):
    """Pre-RMSNorm residual block around ``EhrMamba2Mixer``."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.mixer = EhrMamba2Mixer(config, layer_idx=layer_idx, initialize_mixer_weights=False)

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


class EhrMamba2PreTrainedModel(Mamba2PreTrainedModel):
    config_class = EhrMamba2Config
    config: EhrMamba2Config

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_ehr_embedding_weights(module)


class EhrMamba2Model(EhrModelMixin, EhrMamba2PreTrainedModel):
    """Batch dict in, final RMSNorm states (B, L, H) out (``Mamba2Output``)."""

    def __init__(self, config: EhrMamba2Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.ehr_embeddings = EhrEmbeddings(config, use_position_embeddings=False)
        self.layers = nn.ModuleList([EhrMamba2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.norm_f = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
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
    ) -> Mamba2Output:
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
        return Mamba2Output(last_hidden_state=hidden, **cache_kwargs(cache if use_cache else None))

    def _encode(self, **batch) -> torch.Tensor:
        return self(**batch, use_cache=False).last_hidden_state


class EhrMamba2ForCausalLM(EhrModelMixin, StreamGenerationMixin, EhrMamba2PreTrainedModel, GenerationMixin):
    """Next-token prediction over the final RMSNorm states (untied LM head, as HF Mamba2)."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: EhrMamba2Config):
        super().__init__(config)
        self.backbone = EhrMamba2Model(config)
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
    ) -> Mamba2CausalLMOutput:
        """Batch dict in (streams as in ``EhrMamba2Model.forward``); labels (B, L) aligned with input_ids
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
        return Mamba2CausalLMOutput(loss=loss, logits=logits, **cache_kwargs(output_cache(out)))

    def _encode(self, **batch) -> torch.Tensor:
        return self.backbone._encode(**batch)

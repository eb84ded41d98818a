"""EHR Mamba2: HF Mamba2 blocks (SSD, scalar A per head, gated RMSNorm) over EHR embeddings, causal NTP.

Packed rows: the causal convolution does not read across documents and the SSD scan
(``ehrfm.kernels.mamba_scan.ssd_chunk_scan``: mamba_ssm's Triton scan with ``seq_idx`` on CUDA when installed,
the PyTorch chunked scan otherwise) resets its state at document starts. Block, backbone and causal LM are
the generic ones of ``ssm.py`` (weight names as HF ``Mamba2Model`` / ``Mamba2ForCausalLM``).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin
from transformers.models.mamba2.modeling_mamba2 import (
    Mamba2Block,
    Mamba2CausalLMOutput,
    Mamba2Mixer,
    Mamba2Output,
    Mamba2PreTrainedModel,
    Mamba2RMSNorm,
)

from ...kernels.mamba_scan.ssd import ssd_chunk_scan
from .configuration import EhrMamba2Config
from .embeddings import init_ehr_embedding_weights
from .hf_cache_compat import cache_kwargs, resolve_cache
from .masking import document_starts
from .ssm import EhrSsmBlockMixin, EhrSsmForCausalLMMixin, EhrSsmModelMixin, causal_depthwise_conv, mask_padding


class EhrMamba2Mixer(Mamba2Mixer):
    """HF ``Mamba2Mixer`` parameters; full-sequence forward with document-aware conv and SSD scan."""

    def forward(self, hidden_states, cache=None, attention_mask=None, document_ids=None, cache_params=None, **kwargs):
        """hidden_states (B, L, H) -> (B, L, H); attention_mask (B, L) 0 = padding; document_ids (B, L) or None."""
        cache = resolve_cache(cache, cache_params, kwargs)
        if cache is not None:
            return super().forward(hidden_states, **cache_kwargs(cache), attention_mask=attention_mask)
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        projected = self.in_proj(mask_padding(hidden_states, attention_mask))
        gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        xBC = self.act(causal_depthwise_conv(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, document_ids))
        xBC = mask_padding(xBC.transpose(1, 2), attention_mask)
        groups_state = self.n_groups * self.ssm_state_size
        x, B, C = xBC.split([self.intermediate_size, groups_state, groups_state], dim=-1)
        x = x.reshape(batch, length, self.num_heads, self.head_dim)
        B = B.reshape(batch, length, self.n_groups, self.ssm_state_size)
        C = C.reshape(batch, length, self.n_groups, self.ssm_state_size)
        A = -torch.exp(self.A_log.float())
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
            resets=document_starts(document_ids) if document_ids is not None else None,
        )
        y = self.norm(y.reshape(batch, length, -1), gate)
        return self.out_proj(y.to(dtype))


class EhrMamba2Block(EhrSsmBlockMixin, Mamba2Block):
    """Pre-RMSNorm residual block around ``EhrMamba2Mixer``."""

    mixer_class = EhrMamba2Mixer


class EhrMamba2PreTrainedModel(Mamba2PreTrainedModel):
    config_class = EhrMamba2Config
    config: EhrMamba2Config

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_ehr_embedding_weights(module)


class EhrMamba2Model(EhrSsmModelMixin, EhrMamba2PreTrainedModel):
    """Batch dict in, final RMSNorm states (B, L, H) out (``Mamba2Output``)."""

    block_class, norm_class, output_class = EhrMamba2Block, Mamba2RMSNorm, Mamba2Output


class EhrMamba2ForCausalLM(EhrSsmForCausalLMMixin, EhrMamba2PreTrainedModel, GenerationMixin):
    """Next-token prediction over ``EhrMamba2Model`` (``Mamba2CausalLMOutput``)."""

    backbone_class, output_class = EhrMamba2Model, Mamba2CausalLMOutput

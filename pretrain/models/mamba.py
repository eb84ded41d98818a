"""EHR Mamba (v1): HF Mamba blocks (001 C.1) over EHR embeddings, causal NTP (EhrMamba, 001 3.2).

The mixer's full-sequence path runs the fast selective scan of ``ehrfm.kernels.mamba_scan`` (mamba_ssm's CUDA
kernel when installed) instead of HF's sequential fallback; packed rows reset the SSM state at document
starts and the causal convolution does not read across documents. Block, backbone and causal LM are the
generic ones of ``ssm.py`` (weight names as HF ``MambaModel`` / ``MambaForCausalLM``).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin
from transformers.models.mamba.modeling_mamba import (
    MambaBlock,
    MambaCausalLMOutput,
    MambaMixer,
    MambaOutput,
    MambaPreTrainedModel,
    MambaRMSNorm,
)

from ...kernels.mamba_scan.scan import selective_scan
from .configuration import EhrMambaConfig
from .embeddings import init_ehr_embedding_weights
from .hf_cache_compat import cache_kwargs, resolve_cache
from .masking import document_starts
from .ssm import EhrSsmBlockMixin, EhrSsmForCausalLMMixin, EhrSsmModelMixin, causal_depthwise_conv, mask_padding


class EhrMambaMixer(MambaMixer):
    """HF ``MambaMixer`` parameters; full-sequence forward through ``selective_scan`` with document resets."""

    def forward(self, hidden_states, cache=None, attention_mask=None, document_ids=None, cache_params=None, **kwargs):
        """hidden_states (B, L, H) -> (B, L, H). attention_mask (B, L) 0 = padding; document_ids (B, L) for packed
        rows (None: one document per row)."""
        cache = resolve_cache(cache, cache_params, kwargs)
        if cache is not None:
            return super().forward(hidden_states, **cache_kwargs(cache), attention_mask=attention_mask)
        dtype = hidden_states.dtype
        projected = self.in_proj(mask_padding(hidden_states, attention_mask)).transpose(1, 2)
        x, gate = projected.chunk(2, dim=1)  # (B, I, L) each
        x = self.act(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias, document_ids))
        x = mask_padding(x.transpose(1, 2), attention_mask)  # (B, L, I)
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


class EhrMambaBlock(EhrSsmBlockMixin, MambaBlock):
    """Pre-RMSNorm residual block around ``EhrMambaMixer``."""

    mixer_class = EhrMambaMixer


class EhrMambaPreTrainedModel(MambaPreTrainedModel):
    config_class = EhrMambaConfig
    config: EhrMambaConfig

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_ehr_embedding_weights(module)


class EhrMambaModel(EhrSsmModelMixin, EhrMambaPreTrainedModel):
    """Batch dict in, final RMSNorm states (B, L, H) out (``MambaOutput``)."""

    block_class, norm_class, output_class = EhrMambaBlock, MambaRMSNorm, MambaOutput


class EhrMambaForCausalLM(EhrSsmForCausalLMMixin, EhrMambaPreTrainedModel, GenerationMixin):
    """Next-token prediction over ``EhrMambaModel`` (``MambaCausalLMOutput``)."""

    backbone_class, output_class = EhrMambaModel, MambaCausalLMOutput

"""EHR input embeddings (001 sections 2.1-2.2 and C.2), shared by every backbone.

A token's embedding combines its concept embedding (the backbone's own word-embedding table, so HF weight
names and LM-head tying are unchanged) with attribute embeddings:

    concat_project:  Linear([concept ; Time2Vec(time) ; Time2Vec(age)]) + type + segment + order (+ position)
    sum:             concept + P_t Time2Vec(time) + P_a Time2Vec(age) + type + segment + order (+ position)

followed by LayerNorm and dropout. Special tokens ([CLS], [VS], [VE], [REG], interval and task tokens, and
padding) get zero time, age, visit-segment and visit-order embeddings; they keep their concept, type and
position embeddings (001 2.2). Absolute position embeddings exist only for backbones without their own
position mechanism (BERT); Llama and ModernBERT use RoPE, XLNet relative positions and Mamba needs none.

Streams that are not given (e.g. ``ages`` at inference from a bare token sequence) contribute nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from ...data_shards.schema import SPECIAL_TYPES, TokenType


def event_type_mask(type_vocab_size: int) -> torch.Tensor:
    """(type_vocab_size,) bool: True for clinical event types, False for padding and special token types."""
    is_event = torch.ones(type_vocab_size, dtype=torch.bool)
    is_event[[TokenType.PAD, *SPECIAL_TYPES]] = False
    return is_event


class Time2Vec(nn.Module):
    """Time2Vec (Kazemi et al. 2019): one linear and ``size - 1`` periodic features of a scalar.

    tau (...) float -> (..., size): [w_0 tau + b_0, sin(w_i tau + b_i) for i = 1..size-1], all w, b learnable.
    """

    def __init__(self, size: int):
        super().__init__()
        if size < 2:
            raise ValueError("Time2Vec needs size >= 2 (one linear and at least one periodic feature)")
        self.weight = nn.Parameter(torch.empty(size))
        self.bias = nn.Parameter(torch.empty(size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # `transformers.initialization` so that HF's loading skips parameters that come from a checkpoint
        init.normal_(self.weight, std=1.0)
        init.uniform_(self.bias, -torch.pi, torch.pi)

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        phase = tau.float()[..., None] * self.weight + self.bias
        return torch.cat([phase[..., :1], torch.sin(phase[..., 1:])], dim=-1)


class EhrEmbeddings(nn.Module):
    """Attribute embeddings added to (or projected with) the concept embeddings; see the module docstring.

    Attribute names follow ``BertEmbeddings`` (token_type_embeddings, position_embeddings, LayerNorm) so a BERT
    checkpoint keeps HF's key names.
    """

    def __init__(self, config, use_position_embeddings: bool = False, normalize: bool = True):
        """normalize=False: no LayerNorm and dropout (the raw sum is returned), for backbones that normalize
        their input embeddings themselves (ModernBERT)."""
        super().__init__()
        hidden, tsize = config.hidden_size, config.time_embedding_size
        self.combine = config.embedding_combine
        self.age_scale, self.time_scale = float(config.age_scale), float(config.time_scale)
        self.max_visit_orders = config.max_visit_orders
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden, padding_idx=TokenType.PAD)
        self.visit_segment_embeddings = nn.Embedding(config.num_visit_segments, hidden, padding_idx=0)
        self.visit_order_embeddings = nn.Embedding(config.max_visit_orders, hidden, padding_idx=0)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, hidden) if use_position_embeddings else None
        )
        self.time_embeddings = Time2Vec(tsize)
        self.age_embeddings = Time2Vec(tsize)
        if self.combine == "concat_project":
            self.concept_projection = nn.Linear(hidden + 2 * tsize, hidden)
        else:
            # no bias: a token with zero time/age features (special tokens) must get a zero vector
            self.time_projection = nn.Linear(tsize, hidden, bias=False)
            self.age_projection = nn.Linear(tsize, hidden, bias=False)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.embedding_layer_norm_eps) if normalize else None
        self.dropout = nn.Dropout(config.embedding_dropout) if normalize else None
        self.register_buffer("is_event_type", event_type_mask(config.type_vocab_size), persistent=False)

    def forward(
        self,
        concept_embeds: torch.Tensor,
        type_ids: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        visit_segments: torch.Tensor | None = None,
        visit_orders: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """concept_embeds (B, L, H); type_ids, visit_segments, visit_orders, position_ids (B, L) int;
        ages (B, L) float years; times (B, L) float weeks since 1970-01-01. Returns (B, L, H)."""
        batch, length, _ = concept_embeds.shape
        dtype = concept_embeds.dtype
        is_event = self.is_event_type[type_ids] if type_ids is not None else None

        def temporal(t2v: Time2Vec, values: torch.Tensor | None, scale: float) -> torch.Tensor:
            if values is None:
                return concept_embeds.new_zeros(batch, length, t2v.weight.shape[0])
            features = t2v(values * scale)
            if is_event is not None:
                features = features * is_event[..., None]
            return features.to(dtype)

        time_features = temporal(self.time_embeddings, times, self.time_scale)
        age_features = temporal(self.age_embeddings, ages, self.age_scale)
        if self.combine == "concat_project":
            hidden = self.concept_projection(torch.cat([concept_embeds, time_features, age_features], dim=-1))
        else:
            hidden = concept_embeds + self.time_projection(time_features) + self.age_projection(age_features)

        if type_ids is not None:
            hidden = hidden + self.token_type_embeddings(type_ids)
        # index 0 is the zero padding row, so special tokens are routed there
        if visit_segments is not None:
            segments = visit_segments if is_event is None else visit_segments * is_event
            hidden = hidden + self.visit_segment_embeddings(segments)
        if visit_orders is not None:
            orders = visit_orders.clamp(0, self.max_visit_orders - 1)
            orders = orders if is_event is None else orders * is_event
            hidden = hidden + self.visit_order_embeddings(orders)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(length, device=hidden.device).expand(batch, length)
            hidden = hidden + self.position_embeddings(position_ids)
        if self.LayerNorm is None or self.dropout is None:
            return hidden
        return self.dropout(self.LayerNorm(hidden))


def init_ehr_embedding_weights(module: nn.Module) -> None:
    """Called from each backbone's ``_init_weights``: HF's generic init covers Linear/Embedding/LayerNorm but
    neither Time2Vec's parameters nor the non-persistent type mask (rebuilt when loading on the meta device)."""
    if isinstance(module, Time2Vec):
        module.reset_parameters()
    elif isinstance(module, EhrEmbeddings):
        init.copy_(module.is_event_type, event_type_mask(module.is_event_type.shape[0]))

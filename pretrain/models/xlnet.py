"""EHR XLNet: HF XLNet layers (relative positions, GeLU, post-LayerNorm) over EHR embeddings, permutation LM
(003 Table 2 and B.1).

Weight names equal HF ``XLNetModel`` / ``XLNetLMHeadModel`` (transformer.word_embedding, transformer.mask_emb,
transformer.layer.*, lm_loss) plus ``transformer.ehr_embeddings.*``. XLNet takes no 4D attention mask: packed
documents are isolated through its ``perm_mask`` (1 = blocked), and its positions are relative, so a packed
document sees the same distances as alone. ehrfm's token types are EHR embeddings, not XLNet segments: the
segment tensors (``seg_embed``, ``r_s_bias``) are kept for HF compatibility but frozen (they get no gradient).

Permutation LM (``plm_rank``): ``plm_rank`` (B, L) holds each target's place in the factorization order and -1
for the context tokens (``objectives.plm_inputs`` draws it). The query stream then predicts every position
(XLNet's ``target_mapping`` is the identity), so logits are (B, L, V) aligned with ``labels`` like MLM's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.models.xlnet.modeling_xlnet import XLNetLayer, XLNetModel, XLNetPreTrainedModel

from .common import IGNORE_INDEX, EhrModelMixin, embed_inputs, masked_lm_loss
from .configuration import EhrXLNetConfig
from .embeddings import EhrEmbeddings, init_ehr_embedding_weights
from .masking import document_starts, packed_attention_mask, plm_perm_mask, resolve_document_ids

FROZEN_SEGMENT_PARAMETERS = ("seg_embed", "r_s_bias")


def _follow_default_device(module: nn.Module, names) -> None:
    """Re-create parameters that HF builds with the legacy ``torch.FloatTensor`` (always a CPU float32 tensor)
    with ``torch.empty``, which follows the default device and dtype (meta-device builds, bf16 loading)."""
    for name in names:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(torch.empty(old.shape), requires_grad=old.requires_grad))


class EhrXLNetLayer(GradientCheckpointingLayer, XLNetLayer):
    """HF's ``XLNetLayer`` with gradient checkpointing and parameters on the default device."""

    def __init__(self, config: EhrXLNetConfig):
        super().__init__(config)
        _follow_default_device(
            self.rel_attn, ("q", "k", "v", "o", "r", "r_r_bias", "r_s_bias", "r_w_bias", "seg_embed")
        )
        for name in FROZEN_SEGMENT_PARAMETERS:
            getattr(self.rel_attn, name).requires_grad_(False)


class EhrXLNetPreTrainedModel(XLNetPreTrainedModel):
    config_class = EhrXLNetConfig
    config: EhrXLNetConfig
    _can_record_outputs = {}
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_ehr_embedding_weights(module)


def left_to_right_rank(labels: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """``plm_rank`` of a plain PLM step: every labelled token except a document's first is a target, in reading
    order (XLNet then predicts like a left-to-right LM)."""
    starts = document_starts(document_ids)
    starts[:, 0] = True
    targets = (labels != IGNORE_INDEX) & ~starts & (document_ids != 0)
    order = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(targets, order, -1)


class EhrXLNetModel(EhrModelMixin, EhrXLNetPreTrainedModel, XLNetModel):
    """Batch dict in, last states (B, L, H) out (``BaseModelOutput``): the content stream, or with ``plm_rank``
    the query stream (each position predicted from the context and the targets before it, never from itself).
    """

    default_pooling = "last"  # 003 pools the rightmost token of every model; HF's XLNet summary_type "last"
    seq_first_layers = True  # XLNet's layers take and return (L, B, H) (ALFIA's hooks transpose)

    def __init__(self, config: EhrXLNetConfig):
        XLNetPreTrainedModel.__init__(self, config)  # XLNetModel.__init__ would build every layer twice
        self.mem_len = config.mem_len
        self.reuse_len = config.reuse_len
        self.d_model = config.d_model
        self.same_length = config.same_length
        self.attn_type = config.attn_type
        self.bi_data = config.bi_data
        self.clamp_len = config.clamp_len
        self.n_layer = config.n_layer
        self.word_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.mask_emb = nn.Parameter(torch.empty(1, 1, config.d_model))
        self.ehr_embeddings = EhrEmbeddings(config, use_position_embeddings=False)
        self.layer = nn.ModuleList([EhrXLNetLayer(config) for _ in range(config.n_layer)])
        self.dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        plm_rank: torch.Tensor | None = None,
        perm_mask: torch.Tensor | None = None,
        target_mapping: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **streams,
    ) -> BaseModelOutput:
        """Streams (B, L) as ``schema.BATCH_KEYS`` (position_ids are ignored: XLNet's positions are relative);
        ``plm_rank`` (B, L) switches on the query stream (see the module docstring). HF's ``perm_mask``
        (B, L, L, 1 = blocked) and ``target_mapping`` (B, P, L) are honoured too, on top of the document mask."""
        hidden = embed_inputs(self.word_embedding, self.ehr_embeddings, input_ids, inputs_embeds, streams)
        batch, length = hidden.shape[:2]
        documents = resolve_document_ids(document_ids, attention_mask, (batch, length), hidden.device)
        allowed = packed_attention_mask(documents, causal=False, dtype=hidden.dtype, attn_implementation="sdpa")
        blocked = (~allowed[:, 0]).to(hidden.dtype)
        if plm_rank is not None:
            blocked = torch.maximum(blocked, plm_perm_mask(documents, plm_rank >= 0, plm_rank).to(hidden.dtype))
            if target_mapping is None:
                target_mapping = torch.eye(length, dtype=hidden.dtype, device=hidden.device).expand(batch, -1, -1)
        if perm_mask is not None:
            blocked = torch.maximum(blocked, perm_mask.to(hidden.dtype))
        out = XLNetModel.forward(
            self,
            inputs_embeds=hidden,
            perm_mask=blocked,
            target_mapping=target_mapping,
            use_mems=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return BaseModelOutput(
            last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states, attentions=out.attentions
        )

    def _encode(self, **batch) -> torch.Tensor:
        return self(**batch).last_hidden_state


class EhrXLNetLMHeadModel(EhrModelMixin, EhrXLNetPreTrainedModel):
    """Permutation language modeling: XLNet's LM head (tied to the word embeddings, with a bias) on the query
    stream. ``labels`` (B, L) hold the targets' ids and -100 elsewhere. Without ``plm_rank`` (and without HF's
    ``perm_mask``), labelled tokens are predicted left to right (``left_to_right_rank``)."""

    default_pooling = "last"
    _tied_weights_keys = {"lm_loss.weight": "transformer.word_embedding.weight"}

    def __init__(self, config: EhrXLNetConfig):
        super().__init__(config)
        self.transformer = EhrXLNetModel(config)
        self.lm_loss = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_loss

    def set_output_embeddings(self, new_embeddings):
        self.lm_loss = new_embeddings

    def forward(self, labels: torch.LongTensor | None = None, **batch) -> MaskedLMOutput:
        """Batch dict in (``EhrXLNetModel.forward``); returns logits (B, L, V) (or (B, P, V) with an HF
        ``target_mapping``) and the mean fp32 loss over the targets."""
        if labels is not None and batch.get("plm_rank") is None and batch.get("perm_mask") is None:
            reference = batch["input_ids"] if batch.get("input_ids") is not None else batch["inputs_embeds"][..., 0]
            documents = resolve_document_ids(
                batch.get("document_ids"), batch.get("attention_mask"), reference.shape, reference.device
            )
            batch["plm_rank"] = left_to_right_rank(labels, documents)
            labels = labels.masked_fill(batch["plm_rank"] < 0, IGNORE_INDEX)
        out = self.transformer(**batch)
        logits = self.lm_loss(out.last_hidden_state)
        loss = masked_lm_loss(logits, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)

    def _encode(self, **batch) -> torch.Tensor:
        return self.transformer._encode(**batch)

"""EHR BERT: HF BERT encoder (absolute positions, GeLU, post-LayerNorm) over EHR embeddings, MLM (the
CEHR-BERT-style baseline of 001 and 003).

Weight names equal HF ``BertModel`` / ``BertForMaskedLM`` (bert.embeddings.{word,position,token_type}_embeddings,
bert.embeddings.LayerNorm, bert.encoder.*, cls.predictions.*) plus the extra EHR attribute embeddings under
bert.embeddings.*. Packed rows get a block-diagonal bidirectional mask and positions restarting per document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.models.bert.modeling_bert import BertEncoder, BertOnlyMLMHead, BertPreTrainedModel

from .common import IGNORE_INDEX, EhrModelMixin
from .configuration import EhrBertConfig
from .embeddings import EhrEmbeddings, init_ehr_embedding_weights
from .masking import (
    flash_varlen_kwargs,
    packed_attention_mask,
    position_ids_per_document,
    resolve_document_ids,
    uses_flash_attention,
)


class EhrBertEmbeddings(EhrEmbeddings):
    """``EhrEmbeddings`` with BERT's word and absolute position tables inside, as in ``BertEmbeddings``."""

    def __init__(self, config):
        super().__init__(config, use_position_embeddings=True)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)

    def forward(self, input_ids=None, inputs_embeds=None, **streams):
        concept = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        return super().forward(concept, **streams)


class EhrBertPreTrainedModel(BertPreTrainedModel):
    config_class = EhrBertConfig
    config: EhrBertConfig
    _can_record_outputs = {}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_ehr_embedding_weights(module)


class EhrBertModel(EhrModelMixin, EhrBertPreTrainedModel):
    """Batch dict in, last encoder states (B, L, H) out (``BaseModelOutput``). No pooler: patient embeddings
    come from ``get_patient_embedding`` ([CLS] / first token of each document by default)."""

    default_pooling = "first"
    embeddings_class: type = EhrBertEmbeddings
    encoder_class: type = BertEncoder

    def __init__(self, config: EhrBertConfig):
        super().__init__(config)
        self.embeddings = self.embeddings_class(config)
        self.encoder = self.encoder_class(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

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
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """All streams (B, L) (``schema.BATCH_KEYS``); document_ids marks packed documents, otherwise
        attention_mask marks padding. Positions restart per document when not given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        batch, length = reference.shape
        documents = resolve_document_ids(document_ids, attention_mask, (batch, length), reference.device)
        if position_ids is None:
            position_ids = position_ids_per_document(documents)
        hidden = self.embeddings(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            type_ids=type_ids,
            ages=ages,
            times=times,
            visit_segments=visit_segments,
            visit_orders=visit_orders,
            position_ids=position_ids,
        )
        hidden = self._run_encoder(hidden, documents, position_ids, packed=document_ids is not None, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden.reshape(batch, length, -1))

    def _run_encoder(self, hidden, documents, position_ids, packed: bool, **kwargs) -> torch.Tensor:
        """Embeddings (B, L, H) -> last encoder states; each document attends only to itself (subclasses with
        other encoders override this)."""
        batch, length = documents.shape
        if uses_flash_attention(self.config):
            hidden = hidden.reshape(1, batch * length, -1)
            kwargs.update(flash_varlen_kwargs(position_ids.reshape(1, -1)))
            mask = None
        else:
            mask = packed_attention_mask(
                documents, causal=False, dtype=hidden.dtype, attn_implementation=self.config._attn_implementation
            )
        return self.encoder(hidden, attention_mask=mask, **kwargs).last_hidden_state

    def _encode(self, **batch) -> torch.Tensor:
        return self(**batch).last_hidden_state


class EhrBertForMaskedLM(EhrModelMixin, EhrBertPreTrainedModel):
    """Masked language modeling (001 eq. 2): BERT's MLM head, decoder tied to the word embeddings."""

    default_pooling = "first"
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }
    # subclasses (BigBird, CEHR-BERT) swap the encoder model and the MLM head, keeping the weight names
    backbone_class: type = EhrBertModel
    mlm_head_class: type = BertOnlyMLMHead

    def __init__(self, config: EhrBertConfig):
        super().__init__(config)
        self.bert = self.backbone_class(config)
        self.cls = self.mlm_head_class(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

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
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """Batch dict in; labels (B, L) hold the original ids at masked positions and -100 elsewhere (the
        masking itself is the objective's job). Returns logits (B, L, V) and the mean MLM loss (fp32)."""
        hidden = self.bert(
            input_ids=input_ids,
            type_ids=type_ids,
            ages=ages,
            times=times,
            visit_segments=visit_segments,
            visit_orders=visit_orders,
            position_ids=position_ids,
            attention_mask=attention_mask,
            document_ids=document_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        ).last_hidden_state
        logits = self.cls(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return MaskedLMOutput(loss=loss, logits=logits)

    def _encode(self, **batch) -> torch.Tensor:
        return self.bert._encode(**batch)

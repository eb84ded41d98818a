"""EHR Bi-LSTM: 001's LSTM baseline, EHR embeddings -> stacked bidirectional LSTM layers -> head.

001 (4.2, Appendix C) does not pretrain it: its comparison row finetunes it from random initialisation
(``ehrfm finetune --init random``). ehrfm can also pretrain it with MLM (a bidirectional LSTM must not see the
token it predicts; [MASK] inputs take care of that), with BERT's MLM head tied to the word embeddings.

Every document runs alone: the layers split the rows into documents (packed rows: by ``document_ids``;
padded rows: the real tokens) and run ``pack_padded_sequence`` over them, so padding never enters a state and a
packed row gives exactly what its documents give alone. Splitting needs the document lengths on the host (one
sync per forward; cuDNN needs them there anyway).

Layer output = [forward state ; backward state] (hidden_size = 2 x units per direction). Patient embedding
(``default_pooling = "ends"``): the forward half at the last token concatenated with the backward half at the
first token, i.e. the final state of each direction after reading the whole document.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.models.bert.modeling_bert import BertLMPredictionHead, BertOnlyMLMHead

from .common import IGNORE_INDEX, EhrModelMixin
from .configuration import EhrBiLstmConfig
from .embeddings import EhrEmbeddings, init_ehr_embedding_weights
from .masking import position_ids_per_document, resolve_document_ids


class DocumentLayout:
    """Where each token goes in a (documents, longest document) layout; built once per forward."""

    def __init__(self, documents: torch.Tensor):
        batch, length = documents.shape
        num = int(documents.max().clamp(min=1))  # host sync: the number of documents per row
        self.real = documents != 0
        flat_doc = torch.arange(batch, device=documents.device)[:, None] * num + (documents - 1).clamp(min=0)
        lengths = torch.zeros(batch * num, dtype=torch.long, device=documents.device)
        lengths.scatter_add_(0, flat_doc[self.real], torch.ones_like(flat_doc[self.real]))
        present = lengths > 0
        # renumber the present documents 0..N-1
        rank = present.long().cumsum(0) - 1
        self.doc = rank[flat_doc]  # (B, L)
        self.pos = position_ids_per_document(documents)
        self.lengths = lengths[present].cpu()
        self.shape = (int(present.sum()), int(self.lengths.max()) if len(self.lengths) else 1)

    def to_documents(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (N, T, H), zeros past each document's end."""
        out = hidden.new_zeros(*self.shape, hidden.shape[-1])
        out[self.doc[self.real], self.pos[self.real]] = hidden[self.real]
        return out

    def to_rows(self, per_document: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(N, T, H) -> (B, L, H), zeros at padding."""
        out = like.new_zeros(*like.shape[:2], per_document.shape[-1])
        out[self.real] = per_document[self.doc[self.real], self.pos[self.real]]
        return out


class EhrBiLstmLayer(nn.Module):
    """One bidirectional LSTM layer over the documents of a batch: (B, L, H) -> (B, L, H)."""

    def __init__(self, config: EhrBiLstmConfig):
        super().__init__()
        self.lstm = nn.LSTM(config.hidden_size, config.lstm_hidden_size, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, layout: DocumentLayout) -> torch.Tensor:
        docs = pack_padded_sequence(
            layout.to_documents(hidden_states), layout.lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(docs)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=layout.shape[1])
        return self.dropout(layout.to_rows(out, hidden_states))


class EhrBiLstmPreTrainedModel(PreTrainedModel):
    config_class = EhrBiLstmConfig
    config: EhrBiLstmConfig
    base_model_prefix = "bilstm"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EhrBiLstmLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.LSTM):  # PyTorch's own LSTM init: U(-1/sqrt(units), 1/sqrt(units))
            bound = 1.0 / math.sqrt(module.hidden_size)
            for param in module.parameters():
                init.uniform_(param, -bound, bound)
        elif isinstance(module, BertLMPredictionHead):
            init.zeros_(module.bias)
        init_ehr_embedding_weights(module)


class EhrBiLstmModel(EhrModelMixin, EhrBiLstmPreTrainedModel):
    """Batch dict in, last layer's states (B, L, H) out (``BaseModelOutput``); see the module docstring."""

    default_pooling = "ends"

    def __init__(self, config: EhrBiLstmConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.embeddings = EhrEmbeddings(config)
        self.layers = nn.ModuleList([EhrBiLstmLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

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
        """All streams (B, L) (``schema.BATCH_KEYS``); position_ids are not used (the LSTM reads in order)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        concept = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        documents = resolve_document_ids(document_ids, attention_mask, concept.shape[:2], concept.device)
        hidden = self.embeddings(
            concept, type_ids=type_ids, ages=ages, times=times, visit_segments=visit_segments, visit_orders=visit_orders
        )
        layout = DocumentLayout(documents)
        for layer in self.layers:
            hidden = layer(hidden, layout)
        return BaseModelOutput(last_hidden_state=hidden)

    def _encode(self, **batch) -> torch.Tensor:
        return self(**batch).last_hidden_state


class EhrBiLstmForMaskedLM(EhrModelMixin, EhrBiLstmPreTrainedModel):
    """MLM over ``EhrBiLstmModel`` with BERT's MLM head (transform + decoder tied to the word embeddings)."""

    default_pooling = "ends"
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bilstm.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: EhrBiLstmConfig):
        super().__init__(config)
        self.bilstm = EhrBiLstmModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(self, labels: torch.LongTensor | None = None, **batch) -> MaskedLMOutput:
        """Batch dict in; labels (B, L) original ids at masked positions, -100 elsewhere."""
        logits = self.cls(self.bilstm(**batch).last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return MaskedLMOutput(loss=loss, logits=logits)

    def _encode(self, **batch) -> torch.Tensor:
        return self.bilstm._encode(**batch)

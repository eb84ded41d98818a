"""EHR CEHR-BERT: 001's CEHR-BERT baseline (Pang et al. 2021, arXiv 2111.08585) on ehrfm's BERT.

What is CEHR-BERT's and kept here:
  * temporal concept embeddings: concept, time and age embeddings concatenated and projected back to the hidden
    size through a dense layer with tanh (``TanhLinear``; ehrfm's BERT projects linearly);
  * artificial time tokens between visits, [VS]/[VE] visit tokens (ehrfm's sequence layout, same for every
    backbone), visit segment and visit order embeddings;
  * MLM plus visit-type prediction (VTP): the visit type of a visit is hidden from the input and predicted at
    every clinical token of that visit, the output layer tied to the visit-type embeddings. The two losses are
    summed (``visit_type_loss_weight``, default 1).

Where ehrfm's version differs from CEHR-BERT:
  * inputs are 001's EHR embedding layer (001 4.2: all its baselines use it): Time2Vec time/age (CEHR-BERT: its
    own sinusoidal time layer), plus token-type and learned absolute position embeddings, which CEHR-BERT
    lacks (it encodes position by visit order);
  * visit types are not a separate input stream: they are the vocabulary's visit-type codes (FHIR
    ``ENCOUNTER/<class>`` tokens, ``config.visit_type_token_ids``) inside each visit. A visit selected for VTP
    (probability = the MLM rate) gets its visit-type token replaced by [MASK] (and dropped from the MLM
    targets); every clinical token of the visit then predicts the visit type. CEHR-BERT feeds a parallel
    masked visit-type sequence to a one-layer decoder with cross-attention; here one BERT prediction transform
    on the encoder state predicts it, the output tied to the visit-type tokens' word embeddings;
  * the VTP loss is an auxiliary term of ``pretrain.objectives`` (logged as ``aux/visit_type``): ``forward``
    computes it when ``visit_type_labels`` are given and returns it beside the MLM ``loss``.
Everything else (encoder, MLM head, packing) is ``bert.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from .bert import EhrBertEmbeddings, EhrBertForMaskedLM, EhrBertModel
from .common import IGNORE_INDEX
from .configuration import EhrCehrBertConfig


class TanhLinear(nn.Linear):
    """``tanh(x W^T + b)``: CEHR-BERT's temporal-concept projection (same weight names as nn.Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


class EhrCehrBertEmbeddings(EhrBertEmbeddings):
    def __init__(self, config):
        if config.embedding_combine != "concat_project":
            raise ValueError(
                "CEHR-BERT concatenates concept, time and age embeddings: embedding_combine='concat_project'"
            )
        super().__init__(config)
        self.concept_projection = TanhLinear(config.hidden_size + 2 * config.time_embedding_size, config.hidden_size)


class EhrCehrBertModel(EhrBertModel):
    """``EhrBertModel`` with CEHR-BERT's tanh temporal-concept projection."""

    config_class = EhrCehrBertConfig
    config: EhrCehrBertConfig
    embeddings_class = EhrCehrBertEmbeddings


@dataclass
class CehrBertMaskedLMOutput(MaskedLMOutput):
    """``loss``: MLM only; ``visit_type_loss``: mean VTP cross-entropy (unweighted) when labels were given."""

    visit_type_loss: torch.Tensor | None = None
    visit_type_logits: torch.Tensor | None = None


class EhrCehrBertForMaskedLM(EhrBertForMaskedLM):
    """MLM + visit-type prediction (see the module docstring)."""

    config_class = EhrCehrBertConfig
    config: EhrCehrBertConfig
    backbone_class = EhrCehrBertModel

    def __init__(self, config: EhrCehrBertConfig):
        super().__init__(config)
        self.visit_type_transform = BertPredictionHeadTransform(config)
        self.post_init()

    def visit_type_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., K) scores over ``config.visit_type_token_ids`` (K classes, in that order)."""
        ids = torch.as_tensor(list(self.config.visit_type_token_ids), dtype=torch.long, device=hidden.device)
        table = self.get_input_embeddings().weight[ids]  # (K, H), tied to the visit-type tokens
        return self.visit_type_transform(hidden) @ table.T.to(hidden.dtype)

    def forward(self, visit_type_labels: torch.Tensor | None = None, **batch) -> CehrBertMaskedLMOutput:
        """``EhrBertForMaskedLM.forward``'s batch, plus visit_type_labels (B, L): class index into
        ``config.visit_type_token_ids`` at VTP targets, -100 elsewhere."""
        captured = {}
        handle = None
        if visit_type_labels is not None:
            handle = self.bert.register_forward_hook(lambda m, a, out: captured.update(hidden=out.last_hidden_state))
        try:
            out = super().forward(**batch)
        finally:
            if handle is not None:
                handle.remove()
        result = CehrBertMaskedLMOutput(loss=out.loss, logits=out.logits)
        if visit_type_labels is not None:
            logits = self.visit_type_logits(captured["hidden"])
            result.visit_type_logits = logits
            result.visit_type_loss = visit_type_loss(logits, visit_type_labels)
        return result


def visit_type_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) over the targets of labels (B, L) (-100 = none); 0 when there are none."""
    valid = labels != IGNORE_INDEX
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), reduction="none"
    )
    return (flat * valid.reshape(-1)).sum() / valid.sum().clamp(min=1)

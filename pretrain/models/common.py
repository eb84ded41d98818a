"""Pieces shared by the backbones: the attribute streams, next-token loss on packed rows, patient
embeddings (pooling) and generation with attribute streams."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...data_shards.schema import SEQUENCE_STREAMS, TokenType
from .masking import document_starts, resolve_document_ids

# Per-token attribute streams the embeddings read besides input_ids.
ATTRIBUTE_STREAMS = tuple(name for name in SEQUENCE_STREAMS if name != "input_ids")
IGNORE_INDEX = -100


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[t + 1] from position t (fp32), ignoring labels == -100.

    logits (B, L, V), labels (B, L), document_ids (B, L) or None. In a packed row the first token of a document
    is not a target of the previous document's last token, and padding is never a target, so a packed row
    yields the same per-token losses as its documents run alone.
    """
    targets = labels[:, 1:]
    if document_ids is not None:
        valid = ~document_starts(document_ids)[:, 1:] & (document_ids[:, 1:] != 0)
        targets = targets.masked_fill(~valid, IGNORE_INDEX)
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def embed_inputs(word_embeddings, ehr_embeddings, input_ids, inputs_embeds, streams: dict) -> torch.Tensor:
    """(B, L, H): the concept lookup (or ``inputs_embeds``, which replaces it) through the EHR embeddings over
    the attribute streams present in ``streams`` (other keys are ignored)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    concept = word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
    return ehr_embeddings(concept, **{k: streams.get(k) for k in ATTRIBUTE_STREAMS})


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean fp32 cross-entropy over the labelled positions (labels (B, L), -100 = not a target)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def pool_documents(
    hidden_states: torch.Tensor,
    document_ids: torch.Tensor,
    pooling: str,
    type_ids: torch.Tensor | None = None,
    num_documents: int | None = None,
) -> torch.Tensor:
    """Patient embeddings from token states.

    hidden_states (B, L, H); document_ids (B, L) with 0 = padding. pooling: "last" (last non-pad token of each
    document, 001 3.2.4), "first" ([CLS] / task token at the start), "reg" (mean over [REG] tokens; needs
    type_ids, falls back to zeros for a document without [REG]), "ends" (bidirectional LSTM: the first half of
    the last token's state beside the second half of the first token's state). Returns (B, D, H) with D = num_documents
    (default: the largest document id, one host sync); documents absent from a row give zero rows.
    """
    batch, length, hidden = hidden_states.shape
    if num_documents is None:
        num_documents = int(document_ids.max().clamp(min=1))
    if pooling == "ends":  # bidirectional recurrent states: forward half at the last token, backward at the first
        last, first = (
            pool_documents(hidden_states, document_ids, p, num_documents=num_documents) for p in ("last", "first")
        )
        return torch.cat([last[..., : hidden // 2], first[..., hidden // 2 :]], dim=-1)
    real = document_ids != 0
    if pooling == "last":
        is_end = torch.ones_like(real)
        is_end[:, :-1] = document_ids[:, :-1] != document_ids[:, 1:]
        weight = (is_end & real).to(hidden_states.dtype)
    elif pooling == "first":
        is_start = document_starts(document_ids)
        is_start[:, 0] = True
        weight = (is_start & real).to(hidden_states.dtype)
    elif pooling == "reg":
        if type_ids is None:
            raise ValueError("pooling='reg' needs type_ids")
        weight = ((type_ids == TokenType.REG) & real).to(hidden_states.dtype)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; use 'last', 'first' or 'reg'")
    index = document_ids.clamp(0, num_documents)
    sums = hidden_states.new_zeros(batch, num_documents + 1, hidden)
    sums.scatter_add_(1, index[..., None].expand(-1, -1, hidden), hidden_states * weight[..., None])
    counts = hidden_states.new_zeros(batch, num_documents + 1).scatter_add_(1, index, weight)
    return (sums / counts.clamp(min=1)[..., None])[:, 1:]


class EhrModelMixin:
    """``get_patient_embedding`` for every backbone; subclasses set ``default_pooling`` and implement
    ``_encode(**batch) -> (B, L, H)`` hidden states of the last layer (after the final norm)."""

    default_pooling = "last"

    def get_patient_embedding(
        self, batch: dict, pooling: str | None = None, num_documents: int | None = None
    ) -> torch.Tensor:
        """Patient embeddings, differentiable (finetuning heads train through them).

        batch: the model batch dict (labels ignored). pooling: "last" / "first" / "reg" (see
        ``pool_documents``), default per backbone (causal: last token, BERT: first token). Returns (B, H) for
        unpacked rows, or (B, D, H) when ``document_ids`` is present (one embedding per packed document, zero
        rows for absent ids; D = num_documents, or the largest document id at the cost of one host sync)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = self._encode(**inputs)
        input_ids = inputs["input_ids"]
        documents = resolve_document_ids(
            inputs.get("document_ids"), inputs.get("attention_mask"), input_ids.shape, input_ids.device
        )
        packed = inputs.get("document_ids") is not None
        pooled = pool_documents(
            hidden,
            documents,
            pooling or self.default_pooling,
            inputs.get("type_ids"),
            num_documents=num_documents if packed else 1,
        )
        return pooled if packed else pooled[:, 0]


class StreamGenerationMixin:
    """Generation with attribute streams: streams given to ``generate(**batch)`` cover the prompt; each new
    token repeats the last prompt value of every stream (same visit, same time and age, same type), and each
    step feeds only the slice aligned with the tokens being processed. Missing streams are simply absent
    (their embeddings contribute nothing). Packed rows cannot be generated from."""

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        for key in ATTRIBUTE_STREAMS:
            stream = model_kwargs.get(key)
            if stream is not None:
                model_kwargs[key] = torch.cat([stream, stream[:, -1:].expand(-1, num_new_tokens)], dim=-1)
        return model_kwargs

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        if kwargs.get("document_ids") is not None:
            raise ValueError("generate() takes unpacked rows: drop document_ids and pad the prompts instead")
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        length = model_inputs["input_ids"].shape[1]
        for key in ATTRIBUTE_STREAMS:
            stream = model_inputs.get(key)
            if stream is not None and stream.shape[1] != length:
                model_inputs[key] = stream[:, -length:]
        return model_inputs

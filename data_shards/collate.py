"""Turning patient sequences into model batches: packing (best fit) or length-bucketed padding.

A *document* is one patient sequence (or one chunk of it, with ``long_sequences="split"``) of at most
``context_length`` tokens. Batches follow the model contract of :mod:`ehrfm.data_shards.schema`:
``input_ids, type_ids, ages, times, visit_segments, visit_orders, position_ids, attention_mask,
document_ids, labels`` (B, L); positions restart at 0 for every document; ``document_ids`` are 1.. within a
row and 0 on padding; ``labels`` are the input ids with -100 on padding (objectives shift/mask them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .schema import PAD_ID, SEQUENCE_STREAMS

FLOAT_STREAMS = ("ages", "times")


def cut_document(sample: dict[str, np.ndarray], context_length: int, mode: str) -> list[dict[str, np.ndarray]]:
    """One patient sequence -> documents of <= context_length tokens.

    ``truncate``: keep the most recent tokens (003's right-sided cutoff). ``split``: consecutive chunks,
    so pretraining sees every token.
    """
    n = len(sample["input_ids"])
    if n <= context_length:
        return [sample]

    def cut(lo: int, hi: int) -> dict:
        return {k: (v[lo:hi] if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in sample.items()}

    if mode == "truncate":
        return [cut(n - context_length, n)]
    return [cut(s, s + context_length) for s in range(0, n, context_length)]


def best_fit_pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of documents per row, rows in creation order, each sum <= capacity.

    Ties are broken by index, so the result is a pure function of ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        need = lengths[i]
        best, best_free = -1, capacity + 1
        for r, f in enumerate(free):
            if need <= f < best_free:
                best, best_free = r, f
        if best < 0:
            rows.append([i])
            free.append(capacity - need)
        else:
            rows[best].append(i)
            free[best] -= need
    return rows


def assemble_rows(rows: list[list[dict[str, np.ndarray]]], length: int) -> dict[str, torch.Tensor]:
    """Rows of documents -> a padded batch of width ``length`` (documents laid out left to right)."""
    batch = len(rows)
    out = {k: np.zeros((batch, length), dtype=np.float32 if k in FLOAT_STREAMS else np.int64) for k in SEQUENCE_STREAMS}
    out["input_ids"][:] = PAD_ID
    position_ids = np.zeros((batch, length), dtype=np.int64)
    document_ids = np.zeros((batch, length), dtype=np.int64)
    for r, docs in enumerate(rows):
        offset = 0
        for d, doc in enumerate(docs, start=1):
            n = len(doc["input_ids"])
            if offset + n > length:
                raise ValueError(f"row {r}: documents of {offset + n} tokens exceed the row length {length}")
            for key in SEQUENCE_STREAMS:
                out[key][r, offset : offset + n] = doc[key]
            position_ids[r, offset : offset + n] = np.arange(n)
            document_ids[r, offset : offset + n] = d
            offset += n
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    tensors["position_ids"] = torch.from_numpy(position_ids)
    tensors["document_ids"] = torch.from_numpy(document_ids)
    tensors["attention_mask"] = (tensors["document_ids"] > 0).long()
    labels = tensors["input_ids"].clone()
    labels[tensors["attention_mask"] == 0] = -100
    tensors["labels"] = labels
    return tensors


def real_token_fraction(batch: dict[str, torch.Tensor]) -> float:
    return float(batch["attention_mask"].float().mean())

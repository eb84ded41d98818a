"""Padding / packing bookkeeping shared by the ANAA paths.

Everything is expressed with one (batch, seq) integer tensor ``doc``: 0 marks padding, every other value a
document; documents must be contiguous runs of positions (what packing produces). A plain padding mask is the
special case of one document per row. ANAA is defined per document on its L x L valid block: attention,
noise, smoothing taps and the statistics mu, sigma never cross a document boundary.
"""

from __future__ import annotations

import torch


def document_ids_from(
    attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None, batch: int, seq: int, device
) -> torch.Tensor:
    """Combine the public ``attention_mask`` (batch, seq) bool and ``document_ids`` (batch, seq) int into ``doc``
    (batch, seq) int64 with 0 = padding."""
    if document_ids is not None:
        doc = document_ids.to(device=device, dtype=torch.int64)
        if doc.shape != (batch, seq):
            raise ValueError(f"document_ids must be (batch, seq) = {(batch, seq)}, got {tuple(doc.shape)}")
        if (doc < 0).any():
            raise ValueError("document_ids must be >= 0 (0 = padding)")
    else:
        doc = torch.ones(batch, seq, dtype=torch.int64, device=device)
    if attention_mask is not None:
        if attention_mask.shape != (batch, seq):
            raise ValueError(f"attention_mask must be (batch, seq) = {(batch, seq)}, got {tuple(attention_mask.shape)}")
        doc = doc * attention_mask.to(device=device, dtype=torch.bool)
    return doc


def check_contiguous(doc: torch.Tensor) -> None:
    """Raise if a document id occurs in two separate runs of the same row."""
    prev = torch.nn.functional.pad(doc, (1, 0), value=-1)[:, :-1]
    run_starts = (doc != prev) & (doc != 0)
    for b in range(doc.shape[0]):
        ids = doc[b][run_starts[b]]
        if ids.numel() != torch.unique(ids).numel():
            raise ValueError(
                "each document must be a contiguous run of positions (document_ids row "
                f"{b} repeats an id after a different one)"
            )


def run_starts_index(doc: torch.Tensor) -> torch.Tensor:
    """(batch, seq) int64: index of the first position of the run (document or padding run) containing each
    position."""
    n = doc.shape[1]
    prev = torch.nn.functional.pad(doc, (1, 0), value=-1)[:, :-1]
    is_start = doc != prev
    pos = torch.arange(n, device=doc.device).expand_as(doc)
    return torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=1).values


def document_bounds(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq) int32 pair (start, end): the half-open range [start, end) of the document holding each
    position, which is all a query (or key) there can attend. Padding gets the empty range (seq, 0), so
    min(start) / max(end) over a tile of positions bound the keys (queries) the tile needs."""
    n = doc.shape[1]
    start = run_starts_index(doc)
    nxt = torch.nn.functional.pad(doc, (0, 1), value=-1)[:, 1:]
    is_end = doc != nxt
    pos = torch.arange(n, device=doc.device).expand_as(doc)
    end = torch.where(is_end, pos + 1, torch.full_like(pos, n)).flip(1).cummin(dim=1).values.flip(1)
    pad = doc == 0
    start = start.masked_fill(pad, n)
    end = end.masked_fill(pad, 0)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def allowed(doc: torch.Tensor, causal: bool) -> torch.Tensor:
    """(batch, 1, seq, seq) bool: query i may attend key j (same non-pad document, and j <= i if causal)."""
    m = (doc[:, :, None] == doc[:, None, :]) & (doc != 0)[:, :, None]
    if causal:
        n = doc.shape[1]
        m = m & torch.ones(n, n, dtype=torch.bool, device=doc.device).tril()
    return m[:, None]


def segment_sum(x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Per-run totals broadcast back to positions. x: (batch, heads, seq, dim) or (batch, heads, seq);
    starts: (batch, seq) from :func:`run_starts_index`. Returns a tensor shaped like ``x``."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x[..., None]
    B, H, n, d = x.shape
    idx = starts[:, None, :, None].expand(B, H, n, d)
    tot = torch.zeros_like(x).scatter_add(2, idx, x)
    out = tot.gather(2, idx)
    return out[..., 0] if squeeze else out


def segment_cumsum(x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum restarting at each run start. x: (batch, heads, seq, dim)."""
    B, H, n, d = x.shape
    c = torch.cumsum(x, dim=2)
    before = torch.nn.functional.pad(c, (0, 0, 1, 0))[:, :, :-1]  # sum over positions < i
    idx = starts[:, None, :, None].expand(B, H, n, d)
    return c - before.gather(2, idx)

"""Packing-aware masks and positions derived from ``document_ids`` (B, L): 0 = padding, 1.. = document index.

A packed row holds several patients; every backbone must compute for each of them exactly what it computes
for the patient alone:
  * attention (Llama, BERT): block-diagonal masks (causal or bidirectional). Restarting ``position_ids`` alone
    does NOT isolate documents under sdpa/eager; it only restarts RoPE / absolute positions.
  * flash-attn (when installed): rows are flattened into one varlen sequence with cu_seqlens from positions.
  * SSMs (Mamba, Mamba2): the recurrent state is reset at document starts and the causal convolution must not
    read across a boundary.
Unpacked causal rows padded only at the end need no mask at all: SDPA's own causal kernels (flash /
memory-efficient) then run, and a padded tail never reaches the real tokens before it.
Everything here is tensor arithmetic: no ``.item()`` or host syncs (except the flash varlen lengths, which
flash-attn needs as a Python int, and the one-boolean right-padding check of unpacked rows).
"""

from __future__ import annotations

import torch


def resolve_document_ids(
    document_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: tuple[int, int], device
) -> torch.Tensor:
    """(B, L) long document ids; without packing, one document per row and padding (attention_mask 0) as 0."""
    if document_ids is not None:
        return document_ids.long()
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask != 0).long()
    return torch.ones(shape, dtype=torch.long, device=device)


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True at every token t > 0 whose document differs from token t-1's (state resets there)."""
    starts = torch.zeros_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def same_document_as_previous(document_ids: torch.Tensor, shift: int) -> torch.Tensor:
    """(B, L) bool, True where token t - shift exists and belongs to token t's document (causal conv taps)."""
    same = torch.zeros_like(document_ids, dtype=torch.bool)
    if shift < document_ids.shape[1]:
        same[:, shift:] = document_ids[:, shift:] == document_ids[:, :-shift] if shift else True
    return same


def position_ids_per_document(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) long positions restarting at 0 at the start of every document (and of every padding run)."""
    length = document_ids.shape[1]
    index = torch.arange(length, device=document_ids.device).expand_as(document_ids)
    starts = document_starts(document_ids)
    starts[:, 0] = True
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def packed_attention_mask(
    document_ids: torch.Tensor,
    *,
    causal: bool,
    dtype: torch.dtype,
    attn_implementation: str | None,
    window: int | None = None,
) -> torch.Tensor:
    """(B, 1, L, L) mask allowing query i to see key j iff both are in the same non-padding document (and
    j <= i when causal, and |i - j| <= window when a window is given: ModernBERT's local layers, HF's inclusive
    convention). Padding queries see only themselves, so no softmax row is empty (sdpa would give NaN).

    Boolean (True = attend) for sdpa/flex, additive float (0 / dtype min) for eager.
    """
    length = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    allowed = same & (document_ids != 0)[:, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    if window is not None:
        index = torch.arange(length, device=document_ids.device)
        allowed = allowed & ((index[:, None] - index[None, :]).abs() <= window)
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=document_ids.device)
    allowed = allowed[:, None]
    if attn_implementation in ("sdpa", "flex_attention"):
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def plm_perm_mask(document_ids: torch.Tensor, targets: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """XLNet's ``perm_mask`` (B, L, L) float, 1 = query i may NOT see key j, for permutation LM on packed rows.

    document_ids (B, L) (0 = padding); targets (B, L) bool, the tokens to predict; order (B, L) float, their
    factorization order (smaller = earlier). Non-targets form the context: they see every non-target of their
    document and no target. A target sees the context and the targets before it in the order, never itself
    (XLNet lets the content stream see its own token; the query stream, which predicts, does not) and never
    another document. Padding sees only itself. Pure tensor arithmetic, no host sync.
    """
    rank = torch.where(targets, order.float(), torch.full_like(order, -1.0, dtype=torch.float))
    same = document_ids[:, :, None] == document_ids[:, None, :]
    visible = same & (document_ids != 0)[:, None, :]
    eye = torch.eye(document_ids.shape[1], dtype=torch.bool, device=document_ids.device)
    visible = visible | (eye & ~targets[:, :, None])  # padding sees itself: no fully blocked row
    hidden_target = targets[:, None, :] & (rank[:, :, None] <= rank[:, None, :])
    return (~visible | hidden_target).float()


def flash_varlen_kwargs(flat_position_ids: torch.Tensor) -> dict:
    """kwargs for HF's flash-attention varlen path from one flattened row of per-document positions (1, N):
    cu_seqlens at every position reset. One host sync per forward (flash-attn needs max length as int)."""
    positions = flat_position_ids.view(-1)
    starts = torch.nonzero(positions == 0).view(-1).to(torch.int32)
    total = torch.tensor([positions.numel()], dtype=torch.int32, device=positions.device)
    cu_seqlens = torch.cat([starts, total])
    max_length = int(cu_seqlens.diff().max())
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


def rows_are_right_padded(attention_mask: torch.Tensor | None) -> bool:
    """Whether every row of a (B, L) mask is real tokens then padding (no padding before a real token). One
    host sync."""
    if attention_mask is None:
        return True
    if attention_mask.dim() != 2:
        return False
    keep = attention_mask != 0
    return bool((keep[:, 1:] <= keep[:, :-1]).all())


def uses_flash_attention(config) -> bool:
    return str(getattr(config, "_attn_implementation", "") or "").startswith("flash")

"""Dense-feature auxiliary loss for pretraining (paper 004): gathers patient embeddings from the backbone's
hidden states and returns lam * (L_spec + lam_sub L_sub + lam_orth L_orth), computed in fp32.

Embeddings taken from hidden states (B, L, d):
  * "last": the last real token of every document -- one per row, or one per packed document when
    `document_ids` (B, L) (0 = padding, 1.. = document within the row) is given;
  * "reg":  every [REG] token (TokenType.REG), the patient state at the end of each visit;
  * "both": the two sets stacked into one Z.
L_sub always uses [REG] states: row i of z_a is the [REG] of visit t and row i of z_b the [REG] of visit t+1
of the same document; it is skipped (0) while the batch holds fewer than k such pairs.

Scales (choose the lambdas with them in mind): L_spec in [0, 1); L_sub in [0, 2k]; L_orth is up to ~d^2 and
has a constant floor d^2/(N-1) - d when N <= d (see ehrfm.kernels.dense.reference), hence the small default
lam_orth.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ehrfm.data_shards.schema import TokenType
from ehrfm.kernels.dense import dense_losses
from ehrfm.kernels.dense.reference import subspace_loss


@dataclasses.dataclass
class DenseLossConfig:
    """`dense.*` options of the pretraining config."""

    enabled: bool = False
    lam: float = 0.1  # weight of the whole dense term next to the task loss
    lam_sub: float = 0.05
    lam_orth: float = 1e-4
    k: int = 20  # principal-subspace dimension of L_sub
    source: Literal["last", "reg", "both"] = "last"
    eps: float = 1e-5  # variance regularizer of L_orth's standardization
    impl: Literal["auto", "reference", "triton"] = "auto"


def _doc_ids(attention_mask: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, L) int64: 0 at padding, else the token's document number within its row."""
    if document_ids is not None:
        return document_ids.long() * (attention_mask != 0).long()
    return (attention_mask != 0).long()


def last_token_mask(attention_mask: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool, True at the last real token of each document (documents are contiguous runs)."""
    doc = _doc_ids(attention_mask, document_ids)
    nxt = torch.nn.functional.pad(doc[:, 1:], (0, 1))
    return (doc > 0) & (nxt != doc)


def reg_pairs(
    reg_mask: torch.Tensor, attention_mask: torch.Tensor, document_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into B * L) of consecutive-visit [REG] pairs (visit t, visit t+1) of the same document."""
    doc = _doc_ids(attention_mask, document_ids)
    flat = torch.nonzero((reg_mask & (doc > 0)).flatten()).squeeze(1)  # row-major = time order within a row
    seq_len = doc.shape[1]
    key = (flat // seq_len) * (int(doc.max()) + 1) + doc.flatten()[flat]  # (row, document)
    same = key[1:] == key[:-1]
    return flat[:-1][same], flat[1:][same]


def _global_count(n: int, device: torch.device, group) -> int:
    if group is None:
        return n
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return int(t.item())


def dense_aux_loss(
    hidden_states: torch.Tensor,
    cfg: DenseLossConfig,
    *,
    attention_mask: torch.Tensor,
    document_ids: torch.Tensor | None = None,
    type_ids: torch.Tensor | None = None,
    reg_mask: torch.Tensor | None = None,
    group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted dense loss, {'dense/spec', 'dense/orth', 'dense/sub', 'dense/n_emb', 'dense/n_pairs'}).

    hidden_states (B, L, d) of any float dtype; attention_mask (B, L) 1 = real token; [REG] positions come
    from reg_mask (B, L) bool or type_ids (B, L) == TokenType.REG. With `group`, statistics are over the
    global batch (every rank must call). Logged terms are detached and unweighted.
    """
    if reg_mask is None and type_ids is not None:
        reg_mask = type_ids == TokenType.REG
    needs_reg = cfg.source in ("reg", "both") or cfg.lam_sub > 0
    if needs_reg and reg_mask is None:
        raise ValueError(f"source={cfg.source!r} / lam_sub={cfg.lam_sub} need type_ids or reg_mask")
    d = hidden_states.shape[-1]
    flat_h = hidden_states.reshape(-1, d)
    with torch.autocast(device_type=hidden_states.device.type, enabled=False):
        parts = []
        if cfg.source in ("last", "both"):
            parts.append(flat_h[last_token_mask(attention_mask, document_ids).flatten()])
        if cfg.source in ("reg", "both"):
            parts.append(flat_h[(reg_mask & (attention_mask != 0)).flatten()])
        z = torch.cat(parts).float()

        zero = flat_h.new_zeros((), dtype=torch.float32)
        terms = {"spec": zero, "orth": zero, "sub": zero}
        n_emb = _global_count(z.shape[0], z.device, group)
        if n_emb >= 2:
            losses = dense_losses(z, k=cfg.k, impl=cfg.impl, group=group, eps=cfg.eps)
            terms.update(spec=losses["spec"], orth=losses["orth"])
        n_pairs = 0
        if cfg.lam_sub > 0:
            idx_a, idx_b = reg_pairs(reg_mask, attention_mask, document_ids)
            n_pairs = _global_count(idx_a.numel(), z.device, group)
            if n_pairs >= cfg.k and d >= cfg.k:
                z_a, z_b = flat_h[idx_a].float(), flat_h[idx_b].float()
                if group is None:
                    terms["sub"] = subspace_loss(z_a, z_b, cfg.k)
                else:
                    from ehrfm.kernels.dense.distributed import subspace_loss_distributed

                    terms["sub"] = subspace_loss_distributed(z_a, z_b, cfg.k, group=group)
        total = cfg.lam * (terms["spec"] + cfg.lam_sub * terms["sub"] + cfg.lam_orth * terms["orth"])
    logs = {f"dense/{name}": value.detach() for name, value in terms.items()}
    logs["dense/n_emb"] = torch.tensor(n_emb)
    logs["dense/n_pairs"] = torch.tensor(n_pairs)
    return total, logs

"""Classification heads: the two-layer FFN head (001 eq. 10 / 003 3.4) and ALFIA (002 2.3): the Adaptive
Layer Fusion module (eqs. 2-14) and the Attentional Classifier Head (eqs. 15-19).

Shapes: B batch, T tokens, H hidden size, N_f fused layers. Masks are (B, T) with 1 = real token.
Every head returns one logit per row (binary tasks, BCE-with-logits).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ClassificationHead(nn.Module):
    """Two-layer FFN: dropout -> Linear(H, hidden) -> GELU -> dropout -> Linear(hidden, 1). (B, H) -> (B,)."""

    def __init__(self, hidden_size: int, head_hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        inner = head_hidden or hidden_size
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden_size, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, 1)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled).squeeze(-1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2 / 12: sum_t A_t h_t / sum_t A_t. states (..., T, H), mask (B, T) -> (..., H)."""
    weight = mask.to(states.dtype)
    while weight.dim() < states.dim() - 1:
        weight = weight.unsqueeze(1)
    return (states * weight[..., None]).sum(-2) / weight.sum(-1, keepdim=True).clamp(min=1.0)


class AdaptiveLayerFusion(nn.Module):
    """ALF (002 eqs. 2-14): weights N_f layers by inter-layer attention (optionally sigmoid-gated), fuses the
    token states, enhances them and pools a local (token attention) and a global (masked mean) context.

    forward(layers (B, N_f, T, H), mask (B, T)) -> (out (B, H), layer_weights (B, N_f), token_weights (B, T)).
    Layer weights sum to 1 without gating (mean over heads of the softmax scores of eq. 6), and lie in (0, 1)
    each with gating (eq. 7). Padding never influences any output (masked pooling, masked softmax).
    """

    def __init__(
        self, hidden_size: int, num_layers: int, num_heads: int = 4, gating: bool = True, dropout: float = 0.1
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"ALF: hidden size {hidden_size} is not divisible by {num_heads} layer-attention heads")
        self.num_layers, self.num_heads, self.gating = num_layers, num_heads, gating
        self.head_dim = hidden_size // num_heads
        h = hidden_size
        self.w_q, self.w_k, self.w_v = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)  # eqs. 3-5
        self.w_o = nn.Linear(h, h)
        self.gate = nn.Linear(h, num_layers)  # eq. 7
        # eq. 9: interaction (FFN on the fused states) and content projection, then LayerNorm_1
        self.interaction = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * h, h))
        self.projection = nn.Sequential(nn.Linear(h, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout))
        self.norm1 = nn.LayerNorm(h)
        self.token_score = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 1))  # eq. 10
        self.global_layer = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Dropout(dropout))  # eq. 13
        self.context_fusion = nn.Sequential(nn.Linear(2 * h, h), nn.LayerNorm(h), nn.GELU(), nn.Dropout(dropout))
        self.output_projection = nn.Linear(h, h)  # eq. 14
        self.norm2 = nn.LayerNorm(h)

    def layer_weights(self, layers: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eqs. 2-7: (B, N_f, T, H), (B, T) -> lambda (B, N_f)."""
        batch, n_f = layers.shape[:2]
        if n_f != self.num_layers:
            raise ValueError(f"ALF built for {self.num_layers} layers, got {n_f}")
        summaries = masked_mean(layers, mask)  # (B, N_f, H), eq. 2
        query = summaries.mean(1)  # q_global (B, H)
        q = self.w_q(query).view(batch, self.num_heads, 1, self.head_dim)
        k = self.w_k(summaries).view(batch, n_f, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.w_v(summaries).view(batch, n_f, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)  # (B, n_h, 1, N_f), eq. 6
        if not self.gating:
            return scores.mean(1)[:, 0]
        context = self.w_o((scores @ v).transpose(1, 2).reshape(batch, -1))  # c'_layer_attn (B, H)
        return torch.sigmoid(self.gate(context))  # eq. 7

    def forward(self, layers: torch.Tensor, mask: torch.Tensor):
        lam = self.layer_weights(layers, mask)
        fused = (lam[:, :, None, None] * layers).sum(1)  # eq. 8, (B, T, H)
        enhanced = self.norm1(fused + self.projection(fused) + self.interaction(fused))  # eq. 9
        real = mask.bool()
        scores = self.token_score(enhanced).squeeze(-1).float().masked_fill(~real, float("-inf"))
        beta = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(enhanced.dtype)  # eq. 10 (all-pad row -> 0)
        local = (beta[..., None] * enhanced).sum(1)  # eq. 11
        global_ctx = self.global_layer(masked_mean(enhanced, mask))  # eqs. 12-13
        fused_ctx = self.context_fusion(torch.cat([local, global_ctx], dim=-1))
        out = self.norm2(fused_ctx + self.output_projection(fused_ctx))  # eq. 14
        return out, lam, beta


class AttentionalClassifierHead(nn.Module):
    """ACH (002 eqs. 15-19): self-attention block over the fused vector as a length-1 sequence, FFN, logit.

    (B, H) -> (B,) logits.
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, dropout: float = 0.1, ffn_mult: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(hidden_size), nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, ffn_mult * hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_mult * hidden_size, hidden_size),
        )
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zq = z[:, None, :]  # Z' (B, 1, H)
        attn, _ = self.attn(zq, zq, zq, need_weights=False)  # eq. 15
        z1 = self.norm1(zq + self.dropout(attn))  # eq. 16
        z2 = self.norm2(z1 + self.dropout(self.ffn(z1)))  # eqs. 17-18
        return self.out(z2[:, 0]).squeeze(-1)  # eq. 19


class AlfiaHead(nn.Module):
    """ALF + ACH: (layers (B, N_f, T, H), mask (B, T)) -> (logits (B,), layer weights (B, N_f), ALF output (B, H))."""

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        layer_heads: int = 4,
        gating: bool = True,
        classifier_heads: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.alf = AdaptiveLayerFusion(hidden_size, num_layers, layer_heads, gating, dropout)
        self.ach = AttentionalClassifierHead(hidden_size, classifier_heads, dropout)

    def forward(self, layers: torch.Tensor, mask: torch.Tensor):
        z, lam, _ = self.alf(layers, mask)
        return self.ach(z), lam, z

"""Mamba2's SSD scan (scalar decay per head), chunked, with document resets; ``ssd_reference.py`` is its
sequential oracle.

``ssd_chunk_scan`` dispatches to mamba_ssm's fused Triton scan (``mamba_chunk_scan_combined``) when it is
installed and the tensors are on CUDA -- packed rows pass their documents as ``seq_idx``, which resets the
state at each document start -- and to ``ssd_chunk_scan_torch`` otherwise (the CPU path). Both apply the
time-step bias, softplus and clamp to ``dt_limit`` themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.mamba2.modeling_mamba2 import segment_sum  # masked cumsums: no inf - inf

from .scan import fp32_region

try:  # optional CUDA kernel, the `[gpu]` extra
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _mamba_ssm_chunk_scan
except Exception:  # noqa: BLE001 - absent or incompatible: pure-torch scan
    _mamba_ssm_chunk_scan = None


def _fused_scan_applies(x: torch.Tensor) -> bool:
    return _mamba_ssm_chunk_scan is not None and x.is_cuda


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    resets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba2 SSD scan; shapes as :func:`ssd_chunk_scan_torch`. mamba_ssm's kernel on CUDA when installed
    (its output dtype is x's), else the PyTorch chunked scan (float32)."""
    if _fused_scan_applies(x):
        seq_idx = resets.cumsum(-1).to(torch.int32) if resets is not None else None
        return _mamba_ssm_chunk_scan(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit
        )
    return ssd_chunk_scan_torch(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, resets)


def ssd_chunk_scan_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    resets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The chunked SSD scan in plain PyTorch (float32), with optional document resets.

    x (b, l, heads, head_dim); dt (b, l, heads) raw (bias and softplus applied here); A (heads,) negative;
    B, C (b, l, groups, state); D, dt_bias (heads,); resets (b, l) bool, True at document starts.
    Returns y (b, l, heads, head_dim) float32.

    A reset at step t sets log-decay dt_t * A to -inf: every decay factor spanning t becomes exactly 0. Decays
    are read from segment sums / cumulative sums only (never differences of cumsums, which would give
    inf - inf), so the result stays finite and equals running each document alone. Autocast is disabled inside
    (under bf16 autocast the einsums would otherwise run in bf16).
    """
    with fp32_region(x.device.type):
        return _ssd_chunk_scan_fp32(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, resets)


def _ssd_chunk_scan_fp32(x, dt, A, B, C, chunk_size, D, dt_bias, dt_limit, resets):
    batch, length, heads, head_dim = x.shape
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    dt = F.softplus(dt).clamp(dt_limit[0], dt_limit[1])
    x = x.float()
    B = B.float().repeat_interleave(heads // B.shape[2], dim=2)
    C = C.float().repeat_interleave(heads // C.shape[2], dim=2)
    log_decay = A.float()[None, None] * dt  # (b, l, h)
    if resets is not None:
        log_decay = log_decay.masked_fill(resets[..., None], float("-inf"))
    pad = (-length) % chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, -1, chunk_size, *t.shape[2:])

    xdt, Bc, Cc = chunks(x * dt[..., None]), chunks(B), chunks(C)  # (b, c, s, h, .)
    log_decay = chunks(log_decay).permute(0, 3, 1, 2)  # (b, h, c, s)
    decay = torch.exp(segment_sum(log_decay))  # (b, h, c, s_to, s_from)
    # within a chunk: y_l = sum_{s <= l} (C_l . B_s) decay(s -> l) dt_s x_s
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # state at each chunk end from that chunk's tokens; decay(s -> chunk end) is the last row of `decay`
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", Bc, decay[..., -1, :], xdt)
    cum_decay = torch.exp(torch.cumsum(log_decay, dim=-1))  # decay(chunk start -> l), (b, h, c, s)
    chunk_decay = cum_decay[..., -1]  # (b, h, c)
    carried, state = [], torch.zeros_like(chunk_states[:, 0])
    for c in range(chunk_states.shape[1]):
        carried.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    carried = torch.stack(carried, dim=1)  # state entering each chunk, (b, c, h, p, n)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, carried, cum_decay)
    y = y.reshape(batch, -1, heads, head_dim)[:, :length]
    if D is not None:
        y = y + x * D.float()[:, None]
    return y

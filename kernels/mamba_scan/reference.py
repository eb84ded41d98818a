"""Plain sequential selective scan (Mamba v1 SSM): the oracle for the fast paths in ``scan.py``.

Recurrence per batch row b, channel d and state n, step t (zero initial state):

    h_t = exp(delta_t * A) * keep_t * h_{t-1} + delta_t * B_t * u_t
    y_t = sum_n C_t[n] * h_t[n] + D * u_t,        y_t <- y_t * silu(z_t) when z is given

``keep_t`` is 0 at document starts of a packed row (the state is reset there) and 1 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """delta (batch, channels, length) -> float32 step sizes after the optional per-channel bias and softplus."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    resets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Selective scan, one step at a time, differentiable by autograd.

    Shapes: u, delta, z (batch, channels, length); A (channels, state); B, C (batch, state, length);
    D, delta_bias (channels,); resets (batch, length) bool, True where a new document starts.
    Returns y (batch, channels, length) in u's dtype; computed in float32.
    """
    batch, channels, length = u.shape
    delta = prepare_delta(delta, delta_bias, delta_softplus)
    uf, Af, Bf, Cf = u.float(), A.float(), B.float(), C.float()
    h = uf.new_zeros(batch, channels, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * Af)
        if resets is not None:
            decay = decay * (~resets[:, t]).to(decay.dtype)[:, None, None]
        h = decay * h + (delta[:, :, t] * uf[:, :, t])[:, :, None] * Bf[:, None, :, t]
        ys.append((h * Cf[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + uf * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)

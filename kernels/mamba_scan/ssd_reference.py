"""Plain sequential SSD scan (Mamba2): the oracle for the chunked scan in ``ssd.py``.

Per batch row, head h (scalar decay A_h < 0), head channel p and state n, step t (zero initial state):

    dt_t = clamp(softplus(dt_raw_t + dt_bias_h), dt_limit)
    h_t[p, n] = exp(dt_t * A_h) * keep_t * h_{t-1}[p, n] + dt_t * x_t[p] * B_t[n]
    y_t[p] = sum_n C_t[n] * h_t[p, n] + D_h * x_t[p]

B and C are shared by the heads of a group (heads / groups consecutive heads per group). ``keep_t`` is 0 at
document starts of a packed row and 1 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    resets: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step at a time, differentiable by autograd, in float32.

    x (b, l, heads, head_dim); dt (b, l, heads) raw; A (heads,); B, C (b, l, groups, state); D, dt_bias
    (heads,); resets (b, l) bool, True where a new document starts. Returns y (b, l, heads, head_dim) float32.
    """
    batch, length, heads, head_dim = x.shape
    step = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    step = F.softplus(step).clamp(dt_limit[0], dt_limit[1])  # (b, l, h)
    per_group = heads // B.shape[2]
    Bh = B.float().repeat_interleave(per_group, dim=2)  # (b, l, h, n)
    Ch = C.float().repeat_interleave(per_group, dim=2)
    xf = x.float()
    state = xf.new_zeros(batch, heads, head_dim, B.shape[-1])
    ys = []
    for t in range(length):
        decay = torch.exp(step[:, t] * A.float())  # (b, h)
        if resets is not None:
            decay = decay * (~resets[:, t]).to(decay.dtype)[:, None]
        inflow = (step[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + inflow
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # (b, h, p)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y

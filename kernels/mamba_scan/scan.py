"""Fast selective scan for Mamba v1 on CPU (and any device without ``mamba_ssm``), with document resets.

The recurrence (see ``reference.py``) is linear in the state, so the backward pass is the same recurrence run
in reverse: with g_t = dLoss/dh_t,

    g_t = C_t * dy_t + keep_{t+1} * exp(delta_{t+1} A) * g_{t+1}

and every parameter gradient is then an elementwise product / contraction over all steps at once. Only the
two length-L loops (forward states, reverse adjoints) are sequential; each step is one fused ``addcmul`` over
(batch, channels, state), and channels are processed in blocks so the (length, batch, channels, state)
temporaries stay within a memory budget. States are recomputed in backward instead of stored (like the CUDA
kernel), so the autograd graph holds only the inputs.

``selective_scan`` dispatches to ``mamba_ssm``'s CUDA kernel when it is installed and the tensors are on CUDA.
The kernel has no reset input, so packed rows (resets given) are first re-packed one document per row
(``split_documents``: documents sorted by length, grouped so that the padded size stays within twice the
packed one; right padding never reaches earlier steps of a causal scan) and scattered back afterwards. The
kernel takes ``D`` and ``delta_bias`` in float32 only, whatever the parameter dtype. The CPU scan runs in
float32 with autocast disabled (under bf16 autocast its matmuls would otherwise drop to bf16).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .reference import prepare_delta

try:  # optional CUDA kernel, the `[gpu]` extra
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_ssm_scan
except Exception:  # noqa: BLE001 - absent or built for another torch: fall back to the CPU scan
    _mamba_ssm_scan = None

# elements of one (length, batch, channel-block, state) temporary: 2M float32 = 8 MB. Small enough to stay
# cache-friendly (2.3x faster than 64 MB blocks at Small, B=4, L=512 on one core), large enough that the
# per-step Python overhead stays minor.
_BLOCK_ELEMENTS = 1 << 21


def _channel_block(length: int, batch: int, channels: int, state: int) -> int:
    return max(1, min(channels, _BLOCK_ELEMENTS // max(1, length * batch * state)))


def _discretize(delta_l, u_l, A, B_l, keep_l):
    """Step-major (length, batch, dblock, state) decay and input terms for one channel block."""
    decay = torch.exp(delta_l[..., None] * A)
    if keep_l is not None:
        decay = decay * keep_l[:, :, None, None]
    drive = (delta_l * u_l)[..., None] * B_l[:, :, None, :]
    return decay, drive


def _forward_states(decay: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
    states = torch.empty_like(drive)
    states[0] = drive[0]
    for t in range(1, drive.shape[0]):
        torch.addcmul(drive[t], decay[t], states[t - 1], out=states[t])
    return states


class _SelectiveScan(torch.autograd.Function):
    """y = scan(u, delta, A, B, C; keep) without the D skip and z gate (left to autograd, they are elementwise).

    u, delta (batch, channels, length) float32, delta already biased/softplussed; A (channels, state);
    B, C (batch, state, length); keep (batch, length) float32 or None. Returns y (batch, channels, length).
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, keep):
        batch, channels, length = u.shape
        state = A.shape[1]
        u_l, delta_l = u.permute(2, 0, 1), delta.permute(2, 0, 1)  # (L, b, d) views
        B_l, C_l = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()  # (L, b, n)
        keep_l = keep.t().contiguous() if keep is not None else None
        y = u.new_empty(length, batch, channels)
        step = _channel_block(length, batch, channels, state)
        for d0 in range(0, channels, step):
            d1 = min(channels, d0 + step)
            decay, drive = _discretize(delta_l[:, :, d0:d1], u_l[:, :, d0:d1], A[d0:d1], B_l, keep_l)
            states = _forward_states(decay, drive)
            y[:, :, d0:d1] = torch.matmul(states, C_l[..., None])[..., 0]
        ctx.save_for_backward(u, delta, A, B, C, keep)
        return y.permute(1, 2, 0).contiguous()

    @staticmethod
    def backward(ctx, dy):
        with fp32_region(dy.device.type):  # float32 throughout, as in forward
            return _SelectiveScan._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        u, delta, A, B, C, keep = ctx.saved_tensors
        batch, channels, length = u.shape
        state = A.shape[1]
        u_l, delta_l, dy_l = u.permute(2, 0, 1), delta.permute(2, 0, 1), dy.float().permute(2, 0, 1)
        B_l, C_l = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()
        keep_l = keep.t().contiguous() if keep is not None else None
        du, ddelta = torch.empty_like(u_l), torch.empty_like(delta_l)
        dA = torch.empty_like(A)
        dB_l = B_l.new_zeros(B_l.shape)
        dC_l = C_l.new_zeros(C_l.shape)
        step = _channel_block(length, batch, channels, state)
        for d0 in range(0, channels, step):
            d1 = min(channels, d0 + step)
            u_b, delta_b, dy_b = u_l[:, :, d0:d1], delta_l[:, :, d0:d1], dy_l[:, :, d0:d1]
            decay, drive = _discretize(delta_b, u_b, A[d0:d1], B_l, keep_l)
            states = _forward_states(decay, drive)
            # dC_t[n] = sum_d dy_t[d] h_t[d, n]
            dC_l += torch.matmul(dy_b[:, :, None, :], states)[:, :, 0]
            # reverse recurrence for the state adjoints g_t (reuses `drive` as storage)
            adj = drive
            torch.mul(C_l[:, :, None, :], dy_b[..., None], out=adj)
            for t in range(length - 2, -1, -1):
                adj[t].addcmul_(decay[t + 1], adj[t + 1])
            # drive_t = delta_t u_t B_t
            gB = torch.matmul(adj, B_l[..., None])[..., 0]  # sum_n g B  (L, b, dblock)
            du[:, :, d0:d1] = gB * delta_b
            ddelta_b = gB * u_b
            dB_l += torch.matmul((delta_b * u_b)[:, :, None, :], adj)[:, :, 0]
            # decay_t = keep_t exp(delta_t A) multiplies h_{t-1}: d(delta_t A) = g_t h_{t-1} decay_t
            states[1:] = states[:-1].clone()
            states[0] = 0
            grad_log = states.mul_(adj).mul_(decay)  # (L, b, dblock, n)
            ddelta_b = ddelta_b + (grad_log * A[d0:d1]).sum(-1)
            ddelta[:, :, d0:d1] = ddelta_b
            dA[d0:d1] = (grad_log * delta_b[..., None]).sum(dim=(0, 1))
        return (
            du.permute(1, 2, 0),
            ddelta.permute(1, 2, 0),
            dA,
            dB_l.permute(1, 2, 0),
            dC_l.permute(1, 2, 0),
            None,
        )


def selective_scan(
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
    """Mamba v1 selective scan with an explicit backward; same contract as ``selective_scan_reference``.

    Shapes: u, delta, z (batch, channels, length); A (channels, state); B, C (batch, state, length);
    D, delta_bias (channels,); resets (batch, length) bool, True at the first token of each document after the
    first (the state entering that token is dropped). Returns y (batch, channels, length) in u's dtype.
    """
    if _cuda_kernel_applies(u):
        D32 = D.float() if D is not None else None
        bias32 = delta_bias.float() if delta_bias is not None else None
        if resets is None:
            return _mamba_ssm_scan(u, delta, A, B, C, D32, z, bias32, delta_softplus)
        return _scan_per_document(u, delta, A, B, C, D32, z, bias32, delta_softplus, resets)
    with fp32_region(u.device.type):
        delta_f = prepare_delta(delta.float(), delta_bias, delta_softplus)
        keep = (~resets).float() if resets is not None else None
        uf = u.float()
        y = _SelectiveScan.apply(uf, delta_f, A.float(), B.float(), C.float(), keep)
        if D is not None:
            y = y + uf * D.float()[None, :, None]
        if z is not None:
            y = y * F.silu(z.float())
    return y.to(u.dtype)


def fp32_region(device_type: str):
    """Autocast disabled on ``device_type`` (a no-op where autocast does not exist, e.g. meta tensors)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _cuda_kernel_applies(u: torch.Tensor) -> bool:
    return _mamba_ssm_scan is not None and u.is_cuda


def split_documents(resets: torch.Tensor, budget: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Where each token of packed rows goes when every document gets its own row.

    resets (batch, length) bool, True at the first token of each document after a row's first. Documents are
    sorted by length (longest first) and grouped so that ``documents * longest`` stays within ``budget``
    tokens (at least one document per group). Returns per group (rows, steps, slots, width): the packed
    coordinates (rows, steps) of the group's tokens, their destination ``slots`` = document * width + position
    in a (documents, width) grid."""
    batch, length = resets.shape
    segment = torch.cumsum(resets.long(), dim=1)  # document index within the row
    per_row = segment[:, -1] + 1
    first_doc = torch.cumsum(per_row, 0) - per_row  # global index of each row's first document
    doc = (first_doc[:, None] + segment).flatten()  # (batch * length,)
    n_docs = int(per_row.sum())
    sizes = torch.bincount(doc, minlength=n_docs)
    starts = torch.cumsum(sizes, 0) - sizes  # tokens are row-major, so a document's tokens are contiguous
    position = torch.arange(batch * length, device=resets.device) - starts[doc]
    order = torch.argsort(sizes, descending=True, stable=True)
    sizes_sorted = sizes[order].tolist()
    groups, begin = [], 0
    while begin < n_docs:
        width = sizes_sorted[begin]
        end = begin + max(1, budget // max(1, width))
        groups.append((begin, min(end, n_docs), width))
        begin = end
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_docs, device=resets.device)
    flat_rank = rank[doc]
    out = []
    for begin, end, width in groups:
        token = torch.nonzero((flat_rank >= begin) & (flat_rank < end)).squeeze(1)
        slots = (flat_rank[token] - begin) * width + position[token]
        out.append((token // length, token % length, slots, width))
    return out


def _scan_per_document(u, delta, A, B, C, D, z, delta_bias, delta_softplus, resets):
    """The CUDA kernel on packed rows: one document per row, then back to the packed layout."""
    batch, channels, length = u.shape
    y = u.new_empty(batch, length, channels)
    for rows, steps, slots, width in split_documents(resets, budget=2 * batch * length):
        n = int(slots.max()) // width + 1

        def grid(t):  # (batch, C, length) -> (n, C, width), zero right padding
            out = t.new_zeros(n * width, t.shape[1])
            out[slots] = t.permute(0, 2, 1)[rows, steps]
            return out.view(n, width, -1).permute(0, 2, 1).contiguous()

        y_docs = _mamba_ssm_scan(
            grid(u), grid(delta), A, grid(B), grid(C), D, grid(z) if z is not None else None, delta_bias, delta_softplus
        )
        y[rows, steps] = y_docs.permute(0, 2, 1).reshape(n * width, channels)[slots]
    return y.permute(0, 2, 1)

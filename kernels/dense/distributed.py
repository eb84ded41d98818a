"""Dense losses over the GLOBAL batch of a process group, differentiable through the collectives.

Each rank passes its slice z_r (N_r, d) (N_r may differ per rank, even be 0); every rank gets the same loss
values, equal to the single-process losses on the concatenation of all slices in rank order.

Statistics (`torch.distributed.nn.functional` collectives, so the backward runs the matching collective):
  * global N >= d: all-reduce the d x d moments -- Z^T Z (spec, sub), the column sums, then the centred
    column sums of squares (two passes instead of E[z^2] - E[z]^2, which cancels badly in fp32), then
    Zs^T Zs (orth);
  * global N < d:  all-gather the rows (padded to the largest slice, then trimmed) and use the N x N Gram
    forms of `reference`, which is cheaper than d x d and exact.

Gradient convention: the collectives' backward SUMS the upstream gradients of all ranks, and every rank
holds the same (replicated) loss, so z_r.grad = world_size * dL/dz_r. Data-parallel wrappers (DDP, FSDP,
DeepSpeed) AVERAGE parameter gradients over ranks, which turns this into exactly dL/dtheta of the global
loss. Do not rescale the loss by world_size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn import functional as dist_nn

from .reference import DEFAULT_EPS, _fp32, orthogonality_loss, spectral_loss
from .subspace import DEFAULT_GAP_EPS, principal_subspace, projection_distance, top_k_subspace


def _group(group):
    return dist.group.WORLD if group is None else group


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    return dist_nn.all_reduce(t, op=dist.ReduceOp.SUM, group=_group(group))


def global_row_counts(n_local: int, device: torch.device, group=None) -> list[int]:
    """Row count of every rank, in rank order (a non-differentiable all-gather of one integer)."""
    mine = torch.tensor([n_local], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(_group(group)))]
    dist.all_gather(counts, mine, group=_group(group))
    return [int(c.item()) for c in counts]


def gather_rows(z: torch.Tensor, counts: list[int], group=None) -> torch.Tensor:
    """Differentiable all-gather of row slices of different lengths: (sum(counts), d) in rank order."""
    width = max(counts)
    padded = torch.nn.functional.pad(z, (0, 0, 0, width - z.shape[0]))
    parts = dist_nn.all_gather(padded, group=_group(group))
    return torch.cat([part[:n] for part, n in zip(parts, counts)], dim=0)


def _second_moment(z: torch.Tensor, n: int, group) -> torch.Tensor:
    """Global Sigma = Z^T Z / N (d, d)."""
    return _all_reduce(z.T @ z, group) / n


def _orth_from_moments(z: torch.Tensor, n: int, eps: float, group) -> torch.Tensor:
    d = z.shape[1]
    mean = _all_reduce(z.sum(dim=0), group) / n
    zc = z - mean
    var = _all_reduce(zc.square().sum(dim=0), group) / n
    zs = zc * torch.rsqrt(var + eps)
    c = _all_reduce(zs.T @ zs, group) / n
    return (c - torch.eye(d, dtype=c.dtype, device=c.device)).square().sum()


def _subspace(z: torch.Tensor, counts: list[int], k: int, gap_eps: float, group) -> torch.Tensor:
    n, d = sum(counts), z.shape[1]
    if n < d:
        return principal_subspace(gather_rows(z, counts, group), k, gap_eps)
    return top_k_subspace(_second_moment(z, n, group), k, gap_eps)


def dense_losses_distributed(
    z: torch.Tensor,
    *,
    z_related: torch.Tensor | None = None,
    k: int = 20,
    group=None,
    eps: float = DEFAULT_EPS,
    gap_eps: float = DEFAULT_GAP_EPS,
) -> dict[str, torch.Tensor]:
    """Global-batch {'spec', 'orth'[, 'sub']} for this rank's slice z (N_r, d) (and z_related (M_r, d)).

    Collective: every rank of `group` (default: WORLD) must call it with the same k and the same
    presence of z_related.
    """
    z = _fp32(z)
    counts = global_row_counts(z.shape[0], z.device, group)
    n, d = sum(counts), z.shape[1]
    if n < 2:
        raise ValueError(f"need at least 2 embeddings over the group, got {n}")
    if n < d:
        z_all = gather_rows(z, counts, group)
        out = {"spec": spectral_loss(z_all), "orth": orthogonality_loss(z_all, eps)}
        if z_related is not None:
            u_a = principal_subspace(z_all, k, gap_eps)
    else:
        sigma = _second_moment(z, n, group)
        out = {
            "spec": sigma.square().sum() / sigma.diagonal().sum().square() - 1.0 / d,
            "orth": _orth_from_moments(z, n, eps, group),
        }
        if z_related is not None:
            u_a = top_k_subspace(sigma, k, gap_eps)
    if z_related is not None:
        z_related = _fp32(z_related)
        counts_b = global_row_counts(z_related.shape[0], z_related.device, group)
        out["sub"] = projection_distance(u_a, _subspace(z_related, counts_b, k, gap_eps, group))
    return out


def subspace_loss_distributed(
    z_a: torch.Tensor, z_b: torch.Tensor, k: int, *, group=None, gap_eps: float = DEFAULT_GAP_EPS
) -> torch.Tensor:
    """Global-batch L_sub between this rank's slices z_a (N_r, d) and z_b (M_r, d). Collective."""
    z_a, z_b = _fp32(z_a), _fp32(z_b)
    u_a = _subspace(z_a, global_row_counts(z_a.shape[0], z_a.device, group), k, gap_eps, group)
    u_b = _subspace(z_b, global_row_counts(z_b.shape[0], z_b.device, group), k, gap_eps, group)
    return projection_distance(u_a, u_b)

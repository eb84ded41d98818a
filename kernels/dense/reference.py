"""Plain-PyTorch dense losses: the oracle for the Triton kernel and the CPU / default path.

Shapes: z, z_related (N, d) with N embeddings (rows) of width d. All losses are dimensionless scalars.
Inputs of lower precision are upcast: the statistics are always computed in at least fp32.

    spec = || Sigma / tr(Sigma) - I/d ||_F^2,  Sigma = Z^T Z / N (uncentred, Z as given)
         = ||Z Z^T||_F^2 / ||Z||_F^4 - 1/d      (Gram trick; the N x N form when N < d, else d x d)
    orth = || Zs^T Zs / N - I ||_F^2,           Zs = (Z - mean) / sqrt(var + eps), population var (/N)
         = ||Zs Zs^T||_F^2 / N^2 - 2 tr(C) + d  with tr(C) = sum_j var_j / (var_j + eps)   (when N < d)
    sub  = || U_a U_a^T - U_b U_b^T ||_F^2 = 2k - 2 ||U_a^T U_b||_F^2, U = top-k right singular vectors.

Population variance makes diag(C) = 1 (up to eps), so `orth` is exactly the sum of squared off-diagonal
Pearson correlations. Its floor when N <= d: Zs is column-centred, so C has rank r <= N - 1 and trace d; the
minimum of sum_i (lam_i - 1)^2 under those constraints is d (d - r) / r, i.e. d^2 / (N - 1) - d. The floor is
a constant and adds no gradient, but it dominates the value at small N (e.g. N = 2: exactly d (d - 1)).
"""

from __future__ import annotations

import torch

from .subspace import DEFAULT_GAP_EPS, principal_subspace, projection_distance

DEFAULT_EPS = 1e-5


def _fp32(z: torch.Tensor) -> torch.Tensor:
    if z.dim() != 2:
        raise ValueError(f"expected (N, d) embeddings, got shape {tuple(z.shape)}")
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _gram_frobenius_sq(z: torch.Tensor) -> torch.Tensor:
    """||Z^T Z||_F^2 = ||Z Z^T||_F^2 through the smaller of the two Gram matrices."""
    n, d = z.shape
    gram = z @ z.T if n < d else z.T @ z
    return gram.square().sum()


def spectral_loss(z: torch.Tensor) -> torch.Tensor:
    """L_spec of z (N, d); 0 iff Sigma is a multiple of I, at most 1 - 1/d (rank one)."""
    z = _fp32(z)
    s = z.square().sum()
    return _gram_frobenius_sq(z) / s.square() - 1.0 / z.shape[1]


def standardize(z: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Column-standardize z (N, d): zero mean, population variance var / (var + eps)."""
    z = _fp32(z)
    zc = z - z.mean(dim=0, keepdim=True)
    return zc * torch.rsqrt(zc.square().mean(dim=0, keepdim=True) + eps)


def orthogonality_loss(z: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """L_orth of z (N, d) = squared off-diagonal correlations (+ the eps-shrinkage of the diagonal)."""
    zs = standardize(z, eps)
    n, d = zs.shape
    if n < d:
        trace_c = zs.square().sum() / n
        return _gram_frobenius_sq(zs) / n**2 - 2 * trace_c + d
    c = zs.T @ zs / n
    return (c - torch.eye(d, dtype=c.dtype, device=c.device)).square().sum()


def subspace_loss(z_a: torch.Tensor, z_b: torch.Tensor, k: int, gap_eps: float = DEFAULT_GAP_EPS) -> torch.Tensor:
    """L_sub between the top-k principal subspaces of z_a (N_a, d) and z_b (N_b, d), in [0, 2k]."""
    u_a = principal_subspace(_fp32(z_a), k, gap_eps)
    u_b = principal_subspace(_fp32(z_b), k, gap_eps)
    return projection_distance(u_a, u_b)


def dense_losses_reference(
    z: torch.Tensor,
    *,
    z_related: torch.Tensor | None = None,
    k: int = 20,
    eps: float = DEFAULT_EPS,
    gap_eps: float = DEFAULT_GAP_EPS,
) -> dict[str, torch.Tensor]:
    """{'spec', 'orth'[, 'sub']} scalar tensors; `sub` compares z with z_related (row i of both related)."""
    out = {"spec": spectral_loss(z), "orth": orthogonality_loss(z, eps)}
    if z_related is not None:
        out["sub"] = subspace_loss(z, z_related, k, gap_eps)
    return out

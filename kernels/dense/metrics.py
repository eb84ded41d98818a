"""Representation metrics of paper 004 (Tables 1-4), computed in fp64 on Sigma = Z^T Z / N (uncentred).

    effective_rank(z)          exp(-sum_i p_i log p_i), p_i = lam_i / sum_j lam_j        in [1, min(N, d)]
    condition_number(z)        lam_max / lam_min of Sigma (= cond(Z)^2); inf when Sigma is singular
    subspace_distance(a, b, k) ||P_a - P_b||_F^2 / (2k) = mean squared sine of the k principal angles, in [0, 1]
                               (normalized=False gives the raw projection distance in [0, 2k], i.e. L_sub)

All return 0-d float64 tensors (use float(...) for logging). They are not detached, but they are meant for
evaluation: call them under torch.no_grad().
"""

from __future__ import annotations

import torch

from .subspace import principal_subspace, projection_distance


def _spectrum(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, clamped at 0) of Sigma; its nonzero part via the smaller Gram matrix."""
    if z.dim() != 2:
        raise ValueError(f"expected (N, d) embeddings, got shape {tuple(z.shape)}")
    z = z.double()
    n, d = z.shape
    gram = z @ z.T if n < d else z.T @ z
    return torch.linalg.eigvalsh(gram / n).clamp_min(0.0)


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """exp of the Shannon entropy of Sigma's normalized spectrum, z (N, d); 1 = collapsed, d = isotropic."""
    lam = _spectrum(z)
    p = lam / lam.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


def condition_number(z: torch.Tensor) -> torch.Tensor:
    """lam_max / lam_min of Sigma (d x d), z (N, d). Eigenvalues below d * eps_fp64 * lam_max count as 0 (inf)."""
    n, d = z.shape
    if n < d:  # Sigma has rank <= N < d
        return torch.tensor(float("inf"), dtype=torch.float64, device=z.device)
    lam = _spectrum(z)
    lam_max, lam_min = lam[-1], lam[0]
    if lam_min <= d * torch.finfo(torch.float64).eps * lam_max:
        return torch.tensor(float("inf"), dtype=torch.float64, device=z.device)
    return lam_max / lam_min


def subspace_distance(z_a: torch.Tensor, z_b: torch.Tensor, k: int = 20, *, normalized: bool = True) -> torch.Tensor:
    """Distance between the top-k principal subspaces of z_a (N_a, d) and z_b (N_b, d)."""
    dist = projection_distance(principal_subspace(z_a.double(), k), principal_subspace(z_b.double(), k))
    return dist / (2 * k) if normalized else dist

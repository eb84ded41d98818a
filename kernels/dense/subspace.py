"""Top-k principal subspace with a gradient that is stable under (near-)degenerate spectra.

`TopKSubspace.apply(S, k, gap_eps)` takes a symmetric (n, n) matrix S and returns U (n, k): orthonormal
eigenvectors of the k largest eigenvalues (forward: `torch.linalg.eigh`).

The backward is the derivative of the *projector* P = U U^T, not of the individual eigenvectors: a loss that
depends only on span(U) (L_sub, subspace distance) is invariant to rotations inside the subspace, so the
pairs (i, j) that are both in the top-k block contribute nothing and are skipped. What remains is the
eigen-gap formula across the block boundary,

    dL/dS = sym( V_rest [ (V_rest^T G) / gap ] V_top^T ),   gap[j, i] = lam_top[i] - lam_rest[j],

with G = dL/dU (n, k) and sym(A) = (A + A^T) / 2. Degenerate eigenvalues inside
the top-k (e.g. lam_1 == lam_2) therefore do not blow up, unlike `torch.linalg.eigh`'s backward; at the block
boundary the true derivative is ~1/gap, and the inverse gap is clamped: 1 / max(gap, gap_eps * lam_max), so
gradients stay finite when lam_k == lam_{k+1} (where the subspace itself is not unique).

`principal_subspace(z, k)` returns the top-k right singular subspace of z (N, d) -- the principal subspace
of the uncentred second-moment matrix Sigma = Z^T Z / N, as in the paper (truncated SVD of Z) -- through
the d x d matrix when N >= d, or through the N x N Gram Z Z^T / N when N < d (same span, cheaper).
"""

from __future__ import annotations

import torch

DEFAULT_GAP_EPS = 1e-6


class TopKSubspace(torch.autograd.Function):
    """U (n, k) = eigenvectors of the k largest eigenvalues of symmetric S (n, n); projector-gradient."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, k: int, gap_eps: float = DEFAULT_GAP_EPS) -> torch.Tensor:
        n = s.shape[-1]
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must be in [1, {n}]")
        evals, evecs = torch.linalg.eigh(s)  # ascending
        ctx.k, ctx.gap_eps = k, gap_eps
        ctx.save_for_backward(evals, evecs)
        return evecs[:, n - k :].flip(-1)  # descending order of eigenvalue

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor):
        evals, evecs = ctx.saved_tensors
        n, k = evecs.shape[-1], ctx.k
        lam_top, v_top = evals[n - k :].flip(-1), evecs[:, n - k :].flip(-1)
        lam_rest, v_rest = evals[: n - k], evecs[:, : n - k]
        # gap[j, i] = lam_top[i] - lam_rest[j] >= 0; clamp relative to the spectrum's scale.
        scale = evals.abs().max().clamp_min(torch.finfo(evals.dtype).tiny)
        gap = (lam_top[None, :] - lam_rest[:, None]).clamp_min(ctx.gap_eps * scale)
        inner = (v_rest.T @ grad_u) / gap  # (n-k, k)
        ds = v_rest @ inner @ v_top.T
        return 0.5 * (ds + ds.T), None, None


def top_k_subspace(s: torch.Tensor, k: int, gap_eps: float = DEFAULT_GAP_EPS) -> torch.Tensor:
    """(n, k) orthonormal basis of the top-k eigenspace of symmetric s (n, n)."""
    return TopKSubspace.apply(s, k, gap_eps)


def principal_subspace(z: torch.Tensor, k: int, gap_eps: float = DEFAULT_GAP_EPS) -> torch.Tensor:
    """(d, k) orthonormal basis of the top-k right singular subspace of z (N, d), uncentred."""
    n, d = z.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k={k} must be in [1, min(N, d)] = [1, {min(n, d)}]")
    if n < d:
        # span(right singular vectors) = span(Z^T W_k) with W_k the top-k eigenvectors of Z Z^T. The expression
        # below depends on W_k only through its span, which is what TopKSubspace differentiates.
        w = top_k_subspace(z @ z.T / n, k, gap_eps)  # (N, k)
        m = z.T @ w  # (d, k), columns orthogonal with norms sqrt(N * lam_i)
        chol, info = torch.linalg.cholesky_ex(m.T @ m)
        if int(info) == 0:
            return torch.linalg.solve_triangular(chol, m.T, upper=False).T  # m @ chol^{-T}: orthonormal
        # rank(Z) < k: some lam_i = 0, the Gram route cannot normalize; the d x d route still returns a basis.
    return top_k_subspace(z.T @ z / n, k, gap_eps)


def projection_distance(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """||U_a U_a^T - U_b U_b^T||_F^2 = 2k - 2 ||U_a^T U_b||_F^2 for orthonormal (d, k) bases."""
    k = u_a.shape[-1]
    return 2 * k - 2 * (u_a.T @ u_b).square().sum()

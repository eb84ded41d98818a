"""TopKSubspace: projector gradient vs finite differences, stability under (near-)degenerate spectra."""

import pytest
import torch

from ehrfm.kernels.dense.reference import subspace_loss
from ehrfm.kernels.dense.subspace import principal_subspace, projection_distance

f64 = torch.float64


def _with_spectrum(n, lam, seed):
    """(n, d) matrix whose Sigma = Z^T Z / n has eigenvalues lam (n >= d) in a random basis."""
    g = torch.Generator().manual_seed(seed)
    d = len(lam)
    a = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=f64)).Q
    v = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=f64)).Q
    return (n**0.5) * a @ torch.diag(torch.tensor(lam, dtype=f64).sqrt()) @ v.T


def _naive_sub(za, zb, k):
    """Same loss through torch.linalg.eigh's own backward (per-eigenvector gradient)."""

    def u(z):
        return torch.linalg.eigh(z.T @ z / z.shape[0]).eigenvectors[:, -k:]

    return projection_distance(u(za), u(zb))


@pytest.mark.parametrize("na,nb,d,k", [(9, 7, 4, 2), (3, 4, 7, 2), (6, 3, 5, 1)])
def test_sub_gradcheck_both_routes(na, nb, d, k):
    # (9, 7, 4): d x d route for both; (3, 4, 7): N x N Gram route; (6, 3, 5): mixed
    g = torch.Generator().manual_seed(na + nb + d)
    za = torch.randn(na, d, generator=g, dtype=f64).requires_grad_()
    zb = torch.randn(nb, d, generator=g, dtype=f64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: subspace_loss(a, b, k), (za, zb))


def test_gram_route_equals_moment_route():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 9, generator=g, dtype=f64, requires_grad=True)
    zb = torch.randn(12, 9, generator=g, dtype=f64)
    gram = projection_distance(principal_subspace(z, 3), principal_subspace(zb, 3))
    # Pad z with zero rows so that N >= d: Sigma changes by a factor, its eigenvectors do not.
    padded = torch.cat([z, torch.zeros(5, 9, dtype=f64)])
    moment = projection_distance(principal_subspace(padded, 3), principal_subspace(zb, 3))
    torch.testing.assert_close(gram, moment, rtol=1e-10, atol=1e-10)
    (g_gram,) = torch.autograd.grad(gram, z)
    (g_moment,) = torch.autograd.grad(moment, z)
    torch.testing.assert_close(g_gram, g_moment, rtol=1e-7, atol=1e-9)


def test_degenerate_inside_top_k_matches_finite_differences():
    # lam_1 == lam_2 exactly (both in the top-2): the projector is smooth, eigh's own backward is not.
    za = _with_spectrum(8, [5.0, 5.0, 2.0, 1.0, 0.5], seed=0).requires_grad_()
    zb = _with_spectrum(8, [4.0, 3.0, 2.0, 1.0, 0.5], seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: subspace_loss(a, b, 2), (za, zb))
    (naive,) = torch.autograd.grad(_naive_sub(za, zb, 2), za)
    (ours,) = torch.autograd.grad(subspace_loss(za, zb, 2), za)
    # eigh's backward divides roundoff (~1e-16) by a computed gap of ~1e-15: non-finite or O(1) wrong.
    assert not torch.isfinite(naive).all() or (naive - ours).abs().max() > 1e-6


def test_near_degenerate_boundary_gap_matches_finite_differences():
    # lam_2 - lam_3 = 1e-3: large but correct gradient, not clamped.
    za = _with_spectrum(8, [5.0, 3.001, 3.0, 1.0], seed=2).requires_grad_()
    zb = _with_spectrum(8, [4.0, 3.0, 2.0, 1.0], seed=3)
    assert torch.autograd.gradcheck(lambda a: subspace_loss(a, zb, 2), (za,), eps=1e-8, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_safe_inverse_keeps_boundary_degeneracy_finite(dtype):
    # lam_2 == lam_3 exactly at the top-2 boundary: the subspace is not unique; the clamped inverse gap
    # (1 / (gap_eps * lam_max)) keeps the gradient finite and bounded.
    za = _with_spectrum(8, [5.0, 3.0, 3.0, 1.0], seed=4).to(dtype).requires_grad_()
    zb = _with_spectrum(8, [4.0, 3.0, 2.0, 1.0], seed=5).to(dtype)
    loss = subspace_loss(za, zb, 2)
    (grad,) = torch.autograd.grad(loss, za)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.abs().max() < 1e8


def test_rank_below_k_falls_back_and_stays_finite():
    # N = 3 < d = 6 but rank 1 < k = 2: the Gram route cannot normalize its basis; the d x d route is used.
    g = torch.Generator().manual_seed(6)
    za = (torch.randn(3, 1, generator=g, dtype=f64) @ torch.randn(1, 6, generator=g, dtype=f64)).requires_grad_()
    zb = torch.randn(5, 6, generator=g, dtype=f64)
    u = principal_subspace(za, 2)
    torch.testing.assert_close(u.T @ u, torch.eye(2, dtype=f64))
    loss = subspace_loss(za, zb, 2)
    (grad,) = torch.autograd.grad(loss, za)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()

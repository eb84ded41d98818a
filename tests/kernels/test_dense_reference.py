"""Reference dense losses and metrics: hand-computed values, Gram-trick == direct forms, gradcheck."""

import math

import pytest
import torch

from ehrfm.kernels import condition_number, dense_losses, effective_rank, subspace_distance
from ehrfm.kernels.dense.reference import orthogonality_loss, spectral_loss, subspace_loss

f64 = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=f64)


# ---- hand-computed values ------------------------------------------------------------------------------


def test_spec_diag_2x2_by_hand():
    # Z = diag(1, 2): Sigma / tr = diag(1, 4) / 5, minus I/2 = diag(-3/10, 3/10) -> 2 * 9/100 = 0.18
    assert spectral_loss(_t([[1.0, 0.0], [0.0, 2.0]])).item() == pytest.approx(0.18, abs=1e-12)


def test_spec_isotropic_and_rank_one_by_hand():
    assert spectral_loss(3.0 * torch.eye(3, dtype=f64)).item() == pytest.approx(0.0, abs=1e-12)
    # rank one, N >= d: Sigma / tr = diag(1, 0) -> (1/2)^2 + (1/2)^2 = 0.5 = 1 - 1/d
    assert spectral_loss(_t([[1.0, 0.0], [2.0, 0.0]])).item() == pytest.approx(0.5, abs=1e-12)
    # one row, N < d (Gram branch): Sigma / tr = z z^T / 2 has spectrum (1, 0, 0) -> (2/3)^2 + 2 (1/3)^2
    assert spectral_loss(_t([[1.0, 1.0, 0.0]])).item() == pytest.approx(2 / 3, abs=1e-12)


def test_orth_correlated_columns_by_hand():
    # centred columns (-1,-1,1,1) and (-3,1,1,1): var 1 and 3, cov 1, corr 1/sqrt(3) -> 2 * 1/3
    z = _t([[4, -1], [4, 3], [6, 3], [6, 3]])
    assert orthogonality_loss(z, eps=0.0).item() == pytest.approx(2 / 3, abs=1e-12)
    # eps = 1: diag 1/2 and 3/4, off-diagonal 1/sqrt(2*4) -> 1/4 + 1/16 + 2/8 = 9/16
    assert orthogonality_loss(z, eps=1.0).item() == pytest.approx(9 / 16, abs=1e-12)


def test_orth_uncorrelated_columns_is_zero():
    z = _t([[1, 1], [-1, 1], [1, -1], [-1, -1]]) + 7.0
    assert orthogonality_loss(z, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)


def test_orth_floor_two_rows_is_d_times_d_minus_1():
    # N = 2: every standardized column is +-(1, -1), all correlations are +-1 -> d (d - 1)
    z = _t([[1, 2, 3], [4, 0, 5]])
    assert orthogonality_loss(z, eps=0.0).item() == pytest.approx(6.0, abs=1e-10)


def test_orth_floor_is_attained_and_respected():
    # N = 3, d = 4: columns sqrt(3) (cos t e1 + sin t e2), t = j pi/4, in the centred plane form a tight frame,
    # so C has eigenvalues (2, 2, 0, 0) and the loss is the floor d (d - r) / r = 4 (r = N - 1 = 2).
    e1 = _t([1, -1, 0]) / math.sqrt(2)
    e2 = _t([1, 1, -2]) / math.sqrt(6)
    cols = [math.sqrt(3) * (math.cos(j * math.pi / 4) * e1 + math.sin(j * math.pi / 4) * e2) for j in range(4)]
    z = torch.stack(cols, dim=1)
    assert orthogonality_loss(z, eps=0.0).item() == pytest.approx(4.0, abs=1e-10)
    g = torch.Generator().manual_seed(0)
    for n, d in [(3, 4), (5, 16), (9, 12)]:
        floor = d * d / (n - 1) - d
        assert orthogonality_loss(torch.randn(n, d, generator=g, dtype=f64), eps=0.0).item() >= floor - 1e-9


def test_sub_rotated_axis_by_hand():
    za = torch.diag(_t([3.0, 2.0, 1.0]))
    theta = math.pi / 6
    rot = _t([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    zb = za @ rot.T  # top direction (cos t, sin t, 0)
    assert subspace_loss(za, zb, k=1).item() == pytest.approx(2 * math.sin(theta) ** 2, abs=1e-12)  # 0.5
    # k = 2: span(e1, e2) vs span(e3, e2) share one direction -> 2k - 2 * 1 = 2
    assert subspace_loss(za, torch.diag(_t([1.0, 2.0, 3.0])), k=2).item() == pytest.approx(2.0, abs=1e-12)
    # N < d (Gram route): top direction of rows (2,0,0,0), (0,1,0,0) is e1; vs e2 -> 2
    wide_a, wide_b = _t([[2, 0, 0, 0], [0, 1, 0, 0]]), _t([[0, 2, 0, 0], [0, 0, 1, 0]])
    assert subspace_loss(wide_a, wide_b, k=1).item() == pytest.approx(2.0, abs=1e-12)


def test_metrics_by_hand():
    assert effective_rank(torch.eye(4)).item() == pytest.approx(4.0, rel=1e-9)
    # spectrum proportional to (1, 1, 2): p = (1/4, 1/4, 1/2) -> exp(1.5 ln 2) = 2^1.5
    assert effective_rank(torch.diag(_t([1.0, 1.0, math.sqrt(2)]))).item() == pytest.approx(2**1.5, rel=1e-9)
    assert effective_rank(_t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])).item() == pytest.approx(2.0, rel=1e-9)
    assert condition_number(torch.diag(_t([1.0, 2.0, 3.0]))).item() == pytest.approx(9.0, rel=1e-9)
    assert math.isinf(condition_number(torch.randn(3, 5)).item())  # N < d: singular
    assert math.isinf(condition_number(_t([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])).item())
    za = torch.diag(_t([3.0, 2.0, 1.0]))
    zb = za @ _t([[math.cos(0.5), -math.sin(0.5), 0], [math.sin(0.5), math.cos(0.5), 0], [0, 0, 1]]).T
    assert subspace_distance(za, zb, 1).item() == pytest.approx(math.sin(0.5) ** 2, abs=1e-12)
    assert subspace_distance(za, zb, 1, normalized=False).item() == pytest.approx(2 * math.sin(0.5) ** 2, abs=1e-12)


# ---- Gram trick == direct forms ------------------------------------------------------------------------


def _spec_direct(z):
    n, d = z.shape
    sigma = z.T @ z / n
    return (sigma / torch.trace(sigma) - torch.eye(d, dtype=z.dtype) / d).square().sum()


def _orth_direct(z, eps):
    n, d = z.shape
    zs = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)
    return (zs.T @ zs / n - torch.eye(d, dtype=z.dtype)).square().sum()


def _sub_direct(za, zb, k):
    def proj(z):
        u = torch.linalg.svd(z, full_matrices=False).Vh[:k].T
        return u @ u.T

    return (proj(za) - proj(zb)).square().sum()


@pytest.mark.parametrize("n,d", [(5, 12), (12, 5), (7, 7), (1, 6)])
def test_gram_forms_equal_direct_forms(n, d):
    g = torch.Generator().manual_seed(n * 100 + d)
    z = torch.randn(n, d, generator=g, dtype=f64) * torch.linspace(0.2, 3.0, d, dtype=f64)
    torch.testing.assert_close(spectral_loss(z), _spec_direct(z), rtol=1e-10, atol=1e-12)
    if n >= 2:
        torch.testing.assert_close(orthogonality_loss(z, 1e-3), _orth_direct(z, 1e-3), rtol=1e-10, atol=1e-10)
        zb = torch.randn(n + 1, d, generator=g, dtype=f64)
        k = min(n, d) - 1 or 1
        torch.testing.assert_close(subspace_loss(z, zb, k), _sub_direct(z, zb, k), rtol=1e-9, atol=1e-9)


def test_dense_losses_api_keys_dtypes():
    z = torch.randn(16, 8, dtype=torch.bfloat16)
    out = dense_losses(z)
    assert set(out) == {"spec", "orth"} and all(v.dtype == torch.float32 and v.dim() == 0 for v in out.values())
    out = dense_losses(z.float(), z_related=torch.randn(10, 8), k=3, impl="reference")
    assert set(out) == {"spec", "orth", "sub"}
    with pytest.raises(ValueError):
        dense_losses(z, impl="cuda")
    with pytest.raises(ValueError):
        dense_losses(z.float(), z_related=torch.randn(10, 8), k=9)


# ---- gradients vs finite differences -------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(4, 7), (8, 3), (5, 5)])
def test_spec_orth_gradcheck(n, d):
    z = torch.randn(n, d, dtype=f64, generator=torch.Generator().manual_seed(d)).requires_grad_()
    assert torch.autograd.gradcheck(spectral_loss, (z,))
    assert torch.autograd.gradcheck(lambda x: orthogonality_loss(x, 1e-3), (z,))


def test_minimizing_the_losses_spreads_and_aligns_a_linear_encoder():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * torch.logspace(0, -2, 16)  # strongly anisotropic inputs
    x_next = x + 0.05 * torch.randn(256, 16, generator=g)
    w = torch.eye(16).requires_grad_()
    w_next = (torch.eye(16) + 0.5 * torch.randn(16, 16, generator=g)).requires_grad_()
    before = (effective_rank(x @ w).item(), subspace_distance(x @ w, x_next @ w_next, 4).item())
    opt = torch.optim.Adam([w, w_next], lr=0.05)
    for _ in range(150):
        out = dense_losses(x @ w, z_related=x_next @ w_next, k=4)
        opt.zero_grad()
        (out["spec"] + 0.01 * out["orth"] + out["sub"]).backward()
        opt.step()
    with torch.no_grad():
        after = (effective_rank(x @ w).item(), subspace_distance(x @ w, x_next @ w_next, 4).item())
    assert after[0] > 2 * before[0], (before, after)  # ~4.4 -> ~9.7 of 16
    assert after[1] < 0.5 * before[1], (before, after)

"""The O(n d) noise sampler draws (Z . M) V' exactly in distribution: mean 0 and, per row i, covariance
sum_{j allowed for i} v'_j v'_j^T, rows independent -- checked across chunk and document boundaries."""

import pytest
import torch

from ehrfm.kernels import anaa_attention
from ehrfm.kernels.anaa.factorized import sample_noise_product
from ehrfm.kernels.anaa.masks import allowed

S = 6000  # draws: relative error of a covariance entry ~ sqrt(2 / S) ~ 2%
N, D, CHUNK = 23, 3, 4


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    vp = torch.randn(1, 1, N, D, generator=g, dtype=torch.float64)
    doc = torch.tensor([[1] * 9 + [2] * 3 + [3] * 8 + [0] * 3])  # documents straddle chunks of 4
    vp = vp * (doc != 0)[:, None, :, None]
    return vp, doc


@pytest.mark.parametrize("causal", [False, True])
def test_noise_product_mean_std_covariance(causal):
    vp, doc = _setup()
    gen = torch.Generator().manual_seed(1)
    y = sample_noise_product(vp.expand(1, S, N, D), doc, causal, gen, chunk=CHUNK)[0]  # (S, N, D)
    M = allowed(doc, causal)[0, 0].to(vp.dtype)  # (N, N)
    cov = torch.einsum("ij,jd,je->ide", M, vp[0, 0], vp[0, 0])  # exact per-row covariance
    std = cov.diagonal(dim1=-2, dim2=-1).sqrt()  # (N, D)
    emp_mean = y.mean(0)
    emp_cov = torch.einsum("sid,sie->ide", y, y) / S
    assert (emp_mean.abs() <= 5 * std / S**0.5 + 1e-12).all()
    torch.testing.assert_close(y.std(0), std, rtol=0.06, atol=1e-12)
    scale = std[:, :, None] * std[:, None, :]
    assert ((emp_cov - cov).abs() <= 0.08 * scale + 1e-12).all()
    # rows are independent: cross-covariance of two rows of the same document ~ 0
    cross = torch.einsum("sd,se->de", y[:, 2], y[:, 6]) / S
    assert (cross.abs() <= 0.08 * std[2][:, None] * std[6][None, :]).all()
    assert y[:, 20:].abs().max() == 0  # padding


def test_noise_product_gradient_is_unbiased():
    """E[d/dV' <W, Y_Z>] = 0 for the true operator (Z is zero-mean); the sampler's estimator agrees, and its
    draws are linear in V' (scaling V' scales the draw for the same RNG state)."""
    vp, doc = _setup(2)
    vp = vp.expand(1, S, N, D).clone().requires_grad_()
    w = torch.randn(1, 1, N, D, dtype=torch.float64)
    y = sample_noise_product(vp, doc, True, torch.Generator().manual_seed(3), chunk=CHUNK)
    (y * w).sum().backward()
    g = vp.grad[0]
    assert g.mean(0).abs().max() < 5 * g.std(0).max() / S**0.5
    y2 = sample_noise_product(2 * vp.detach(), doc, True, torch.Generator().manual_seed(3), chunk=CHUNK)
    torch.testing.assert_close(y2, 2 * y.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["symmetric", "causal"])
def test_training_output_mean_is_eval_output(variant):
    """E[ANAA_train] = ANAA_eval (eq. 10) for the seeded in-distribution sampler; spread matches explicit Z."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 11, 4, generator=g, dtype=torch.float64) for _ in range(3))
    reps = 1500
    qr, kr, vr = (t.expand(reps, 2, 11, 4) for t in (q, k, v))
    kw = dict(sigma_eh=0.6, variant=variant, sigma_norm="entries", impl="factorized")
    ev = anaa_attention(q, k, v, training=False, **kw)[0]
    tr = anaa_attention(qr, kr, vr, training=True, seed=5, **kw)
    z = torch.randn(reps, 2, 11, 11, generator=g, dtype=torch.float64)
    tz = anaa_attention(qr, kr, vr, training=True, noise=z, **kw)
    sd = tz.std(0)
    assert ((tr.mean(0) - ev).abs() <= 5 * sd / reps**0.5 + 1e-12).all()
    torch.testing.assert_close(tr.std(0), sd, rtol=0.12, atol=1e-9)

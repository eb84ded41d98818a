"""Factorized ANAA vs the naive paper operator (fp64, 1e-10), conventions of the taps, masks, determinism."""

import math

import pytest
import torch

from ehrfm.kernels import anaa_attention
from ehrfm.kernels.anaa.gaussian import conv_rows, gaussian_taps, kernel_size_for, toeplitz
from ehrfm.kernels.anaa.reference import smooth2d

B, H, N, D = 2, 3, 13, 5


def _inputs(seed=0, dtype=torch.float64, n=N):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=dtype) for _ in range(3))
    z = torch.randn(B, H, n, n, generator=g, dtype=dtype)
    return q, k, v, z


def _masks(n=N):
    pad = torch.ones(B, n, dtype=torch.bool)
    pad[1, 9:] = False
    docs = torch.tensor([[1] * 4 + [2] * 6 + [3] * 3, [5] * 3 + [7] * 6 + [0] * 4])
    return {"padding": dict(attention_mask=pad), "packing": dict(document_ids=docs)}


def test_kernel_size_rule_matches_paper():
    assert kernel_size_for(0.33) == 2
    assert kernel_size_for(1.0) == 6
    assert kernel_size_for(0.01) == 2 and kernel_size_for(5.0) == 7


@pytest.mark.parametrize("variant", ["symmetric", "causal"])
@pytest.mark.parametrize("ks", range(2, 8))
def test_separable_conv_equals_toeplitz_sandwich(variant, ks):
    taps = gaussian_taps(0.8, ks, variant)
    assert abs(taps.sum().item() - 1) < 1e-12
    M = torch.randn(2, 9, 9, dtype=torch.float64)
    Gq = toeplitz(taps, 9, variant, "q")
    Gk = toeplitz(taps, 9, variant, "k")
    torch.testing.assert_close(smooth2d(M, taps, variant), Gq @ M @ Gk.T, rtol=0, atol=1e-12)
    x = torch.randn(1, 2, 9, 3, dtype=torch.float64)
    doc = torch.ones(1, 9, dtype=torch.int64)
    torch.testing.assert_close(conv_rows(x, taps, doc, variant, transpose=True), Gk.T @ x, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv_rows(x, taps, doc, variant, transpose=False), Gq @ x, rtol=0, atol=1e-12)
    if variant == "causal":
        assert torch.equal(Gq, Gq.tril()) and torch.equal(Gk, Gk.triu())
    elif ks % 2 == 0:
        assert not torch.allclose(Gq, Gq.T)  # even sizes: G^T needs the flipped taps


@pytest.mark.parametrize("layout", ["padding", "packing"])
@pytest.mark.parametrize("variant", ["symmetric", "causal"])
@pytest.mark.parametrize("ks", range(2, 8))
def test_factorized_equals_naive_fp64(ks, variant, layout):
    q, k, v, z = _inputs(ks)
    for mode in ("anaa", "rna", "smooth"):
        for training in (True, False):
            kw = dict(
                sigma_eh=1.0, kernel_size=ks, variant=variant, training=training, noise=z, mode=mode, **_masks()[layout]
            )
            ref = anaa_attention(q, k, v, impl="reference", **kw)
            fac = anaa_attention(q, k, v, impl="factorized", **kw)
            torch.testing.assert_close(fac, ref, rtol=0, atol=1e-10, msg=f"{mode} training={training}")


@pytest.mark.parametrize("variant", ["symmetric", "causal"])
@pytest.mark.parametrize("detach_sigma", [True, False])
@pytest.mark.parametrize("sigma_norm", ["paper", "entries"])
def test_factorized_grads_equal_autograd_of_naive(variant, detach_sigma, sigma_norm):
    q, k, v, z = _inputs(1)
    w = torch.randn(B, H, N, D, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "factorized"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = anaa_attention(
            *leaves,
            sigma_eh=0.5,
            variant=variant,
            training=True,
            noise=z,
            impl=impl,
            detach_sigma=detach_sigma,
            sigma_norm=sigma_norm,
            **_masks()["packing"],
        )
        (out * w).sum().backward()
        grads[impl] = [t.grad for t in leaves]
    for name, a, b in zip("qkv", grads["factorized"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d{name}")


def test_sigma_gradient_matters():
    """detach_sigma switches a real term on/off: the two gradients differ."""
    q, k, v, z = _inputs(2)
    gq = []
    for detach in (True, False):
        qq = q.clone().requires_grad_()
        anaa_attention(
            qq, k, v, sigma_eh=0.5, training=True, noise=z, detach_sigma=detach, impl="factorized"
        ).square().sum().backward()
        gq.append(qq.grad)
    assert (gq[0] - gq[1]).abs().max() > 1e-6


def test_sigma_norm_literal_paper_formula():
    """'paper' divides by L - 1 (eq. 7): the noise term is sqrt((L^2 - 1) / (L - 1)) times the 'entries' one."""
    q, k, v, z = _inputs(3)
    kw = dict(sigma_eh=1.0, training=True, impl="factorized", mode="rna")
    eval_ = anaa_attention(q, k, v, sigma_eh=1.0, training=False, impl="factorized", mode="rna")
    paper = anaa_attention(q, k, v, noise=z, sigma_norm="paper", **kw) - eval_
    entries = anaa_attention(q, k, v, noise=z, sigma_norm="entries", **kw) - eval_
    torch.testing.assert_close(paper, entries * math.sqrt((N * N - 1) / (N - 1)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "factorized"])
def test_causal_never_reads_the_future(impl):
    """Eval: no content of later positions reaches earlier outputs. Training: later noise and values do not
    either; only the per-document scalar sigma (a function of all of A, as in eq. 7) sees later scores."""
    q, k, v, z = _inputs(4)
    for training in (False, True):
        kw = dict(sigma_eh=1.0, variant="causal", training=training, noise=z, impl=impl)
        out = anaa_attention(q, k, v, **kw)
        q2, k2, v2 = (t.clone() for t in (q, k, v))
        perturbed = (v2,) if training else (q2, k2, v2)
        for t in perturbed:
            t[:, :, 7:] += 3.0
        z2 = z.clone()
        z2[:, :, 7:] += 1.0
        out2 = anaa_attention(q2, k2, v2, **{**kw, "noise": z2})
        torch.testing.assert_close(out2[:, :, :7], out[:, :, :7], rtol=0, atol=1e-12)
        assert (out2[:, :, 7:] - out[:, :, 7:]).abs().max() > 1e-3
    sym = anaa_attention(q, k, v, sigma_eh=1.0, variant="symmetric", training=False, impl=impl)
    v2 = v.clone()
    v2[:, :, 7:] += 3.0
    sym2 = anaa_attention(q, k, v2, sigma_eh=1.0, variant="symmetric", training=False, impl=impl)
    assert (sym2[:, :, :7] - sym[:, :, :7]).abs().max() > 1e-3  # the symmetric operator does look ahead


@pytest.mark.parametrize("variant", ["symmetric", "causal"])
def test_padding_equals_truncated_sequence(variant):
    """A padded row gives the same valid outputs as the row cut to its length (and zeros at the pads)."""
    q, k, v, z = _inputs(5)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, 8:] = False
    kw = dict(sigma_eh=1.0, variant=variant, training=True, impl="factorized")
    full = anaa_attention(q, k, v, attention_mask=mask, noise=z, **kw)
    cut = anaa_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], noise=z[:, :, :8, :8].contiguous(), **kw)
    torch.testing.assert_close(full[:, :, :8], cut, rtol=0, atol=1e-12)
    assert full[:, :, 8:].abs().max() == 0


@pytest.mark.parametrize("impl", ["reference", "factorized"])
def test_eval_is_deterministic_and_seeded_training_reproducible(impl):
    q, k, v, _ = _inputs(6, dtype=torch.float32)
    kw = dict(sigma_eh=0.33, impl=impl)
    assert torch.equal(anaa_attention(q, k, v, training=False, **kw), anaa_attention(q, k, v, training=False, **kw))
    a = anaa_attention(q, k, v, training=True, seed=3, **kw)
    assert torch.equal(a, anaa_attention(q, k, v, training=True, seed=3, **kw))
    assert not torch.allclose(a, anaa_attention(q, k, v, training=True, seed=4, **kw))


def test_noncontiguous_documents_rejected():
    q, k, v, _ = _inputs(7)
    docs = torch.tensor([[1] * 4 + [2] * 5 + [1] * 4] * B)
    with pytest.raises(ValueError, match="contiguous"):
        anaa_attention(q, k, v, sigma_eh=1.0, training=False, document_ids=docs, impl="reference")


def test_auto_is_factorized_on_cpu_and_bad_arguments_rejected():
    q, k, v, z = _inputs(8)
    kw = dict(sigma_eh=1.0, training=True, noise=z)
    assert torch.equal(anaa_attention(q, k, v, **kw), anaa_attention(q, k, v, impl="factorized", **kw))
    with pytest.raises(ValueError, match="noise"):
        anaa_attention(q, k, v, sigma_eh=1.0, training=True, noise=z[:, :, :4])
    with pytest.raises(ValueError, match="mode"):
        anaa_attention(q, k, v, sigma_eh=1.0, training=True, mode="dropout")
    with pytest.raises(ValueError, match="kernel_size"):
        anaa_attention(q, k, v, sigma_eh=1.0, training=False, kernel_size=9)

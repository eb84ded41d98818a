"""Triton kernel (run by the interpreter on CPU, TRITON_INTERPRET=1 from conftest) == fp32 reference."""

import pytest
import torch

pytest.importorskip("triton")

from ehrfm.kernels import dense_losses  # noqa: E402
from ehrfm.kernels.dense.reference import orthogonality_loss, spectral_loss  # noqa: E402
from ehrfm.kernels.dense.triton_kernel import spec_orth_triton  # noqa: E402


def _both(z, fn, w_spec, w_orth):
    z = z.detach().clone().requires_grad_()
    spec, orth = fn(z)
    (w_spec * spec + w_orth * orth).backward()
    return spec.detach(), orth.detach(), z.grad


def _reference(z):
    return spectral_loss(z), orthogonality_loss(z)


# N < d (N x N Gram), N > d (d x d moments), N == d; ragged sizes exercise the masks, > 32 several blocks.
@pytest.mark.parametrize("n,d", [(20, 37), (45, 70), (70, 20), (33, 33), (2, 5)])
def test_triton_matches_reference_fp32(n, d):
    g = torch.Generator().manual_seed(n * 1000 + d)
    z = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d) + torch.linspace(-1.0, 1.0, d)
    ref = _both(z, _reference, 1.3, 0.7)
    tri = _both(z, spec_orth_triton, 1.3, 0.7)
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tri[2], ref[2], rtol=1e-4, atol=1e-6 * ref[2].abs().max().item())


def test_triton_gradient_of_each_term_separately():
    z = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    for w in ((1.0, 0.0), (0.0, 1.0)):
        ref, tri = _both(z, _reference, *w), _both(z, spec_orth_triton, *w)
        torch.testing.assert_close(tri[2], ref[2], rtol=1e-4, atol=1e-6 * ref[2].abs().max().item())


def test_triton_bf16_input_and_public_dispatch():
    z = torch.randn(16, 48, generator=torch.Generator().manual_seed(4))
    zb = z.bfloat16().requires_grad_()
    out = dense_losses(zb, z_related=torch.randn(12, 48), k=4, impl="triton")
    assert set(out) == {"spec", "orth", "sub"} and out["spec"].dtype == torch.float32
    (out["spec"] + out["orth"]).backward()
    assert zb.grad.dtype == torch.bfloat16
    ref = dense_losses(zb.detach(), impl="reference")  # same bf16 values, upcast to fp32
    torch.testing.assert_close(out["spec"], ref["spec"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["orth"], ref["orth"], rtol=1e-5, atol=1e-4)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        dense_losses(torch.randn(8, 4), impl="triton")
    assert set(dense_losses(torch.randn(8, 4), impl="auto")) == {"spec", "orth"}  # auto stays on the reference


@pytest.mark.parametrize("n,d", [(20, 37), (70, 20)])
def test_fp16_gram_on_half_operands_matches_reference(n, d):
    """An fp16 Z's Gram runs on fp16 operands (exact products, fp32 sums): same losses and gradient as the fp32
    reference on the same fp16 values."""
    from ehrfm.kernels.dense import triton_kernel

    z = (torch.randn(n, d, generator=torch.Generator().manual_seed(5)) * 2.0).half()
    assert triton_kernel._half_gram(z) and not triton_kernel._half_gram(z.bfloat16())
    ref = _both(z.float(), _reference, 1.3, 0.7)
    tri = _both(z, spec_orth_triton, 1.3, 0.7)
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tri[2].float(), ref[2], rtol=2e-3, atol=1e-3 * ref[2].abs().max().item())  # fp16 grad


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "half"), (torch.float16, "half"), (torch.float32, "fp32")])
def test_gpu_matmul_autotuner_prunes_to_the_dtype_candidates(dtype, kind):
    from ehrfm.kernels import tuning
    from ehrfm.kernels.dense import triton_kernel

    triton_kernel._matmul_launcher(True, dtype, 64, 2)  # builds the autotuner (launches nothing)
    tuner = tuning._AUTOTUNERS["dense:matmul"]
    kept = tuner.early_config_prune(tuner.configs, {"Z": torch.empty(0, dtype=dtype)})
    assert sorted((c.kwargs["BLOCK_D"], c.num_warps, c.num_stages) for c in kept) == sorted(
        triton_kernel.MATMUL_TILES[kind]
    )


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "half"), (torch.float16, "half"), (torch.float32, "fp32")])
def test_gpu_gram_autotuner_prunes_to_the_dtype_candidates(dtype, kind):
    from ehrfm.kernels import tuning
    from ehrfm.kernels.dense import triton_kernel

    triton_kernel._gram_launcher(True, (2, 2))  # builds the autotuner (launches nothing)
    tuner = tuning._AUTOTUNERS["dense:gram"]
    kept = tuner.early_config_prune(tuner.configs, {"A": torch.empty(0, dtype=dtype)})
    assert sorted((c.num_warps, c.num_stages) for c in kept) == sorted(triton_kernel.GRAM_TILES[kind])

"""Fused Triton ANAA (run by the interpreter on CPU, fp32) vs the naive reference: outputs and dQ/dK/dV.

Stated fp32 tolerance: atol 2e-5, rtol 1e-4 (values and gradients are O(1); the reference materialises A and
runs conv2d, the kernel uses online softmax and separable taps, so only rounding differs)."""

import pytest
import torch

from ehrfm.kernels import anaa_attention

triton = pytest.importorskip("triton")
from ehrfm.kernels.anaa.triton_kernel import philox_noise  # noqa: E402

B, H, N, D = 2, 2, 37, 5  # 3 query tiles of 16, head_dim padded to 16
TOL = dict(rtol=1e-4, atol=2e-5)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    return q, k, v, torch.randn(B, H, N, N, generator=g)


LAYOUTS = {
    "padding": dict(attention_mask=torch.tensor([[True] * N, [True] * 29 + [False] * 8])),
    "packing": dict(document_ids=torch.tensor([[1] * 12 + [2] * 20 + [3] * 5, [4] * 3 + [6] * 17 + [0] * 17])),
}


def _run(impl, q, k, v, w, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = anaa_attention(*leaves, impl=impl, **kw)
    (out * w).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("layout", ["padding", "packing"])
@pytest.mark.parametrize("variant", ["symmetric", "causal"])
@pytest.mark.parametrize("detach_sigma", [True, False])
def test_triton_debug_mode_matches_reference(variant, layout, detach_sigma):
    q, k, v, z = _inputs(0)
    w = torch.randn(B, H, N, D)
    kw = dict(sigma_eh=1.0, variant=variant, training=True, noise=z, detach_sigma=detach_sigma, **LAYOUTS[layout])
    ref = _run("reference", q.double(), k.double(), v.double(), w.double(), **{**kw, "noise": z.double()})
    tri = _run("triton", q, k, v, w, **kw)
    for name, a, b in zip(["out", "dq", "dk", "dv"], tri, ref):
        torch.testing.assert_close(a, b.float(), **TOL, msg=name)


@pytest.mark.parametrize("mode", ["rna", "smooth"])
@pytest.mark.parametrize("training", [True, False])
def test_triton_modes_and_eval_match_reference(mode, training):
    q, k, v, z = _inputs(1)
    w = torch.randn(B, H, N, D)
    kw = dict(
        sigma_eh=0.33,
        variant="causal",
        training=training,
        noise=z,
        mode=mode,
        sigma_norm="entries",
        **LAYOUTS["padding"],
    )
    ref = _run("reference", q.double(), k.double(), v.double(), w.double(), **{**kw, "noise": z.double()})
    tri = _run("triton", q, k, v, w, **kw)
    for name, a, b in zip(["out", "dq", "dk", "dv"], tri, ref):
        torch.testing.assert_close(a, b.float(), **TOL, msg=name)


@pytest.mark.parametrize("variant", ["symmetric", "causal"])
def test_philox_noise_regenerated_in_backward(variant):
    """In-kernel Philox mode == debug mode fed with the same Z: forward and all gradients (the backward
    regenerates the noise tile by tile)."""
    q, k, v, _ = _inputs(2)
    w = torch.randn(B, H, N, D)
    kw = dict(sigma_eh=1.0, variant=variant, training=True, **LAYOUTS["packing"])
    philox = _run("triton", q, k, v, w, seed=1234, **kw)
    debug = _run("triton", q, k, v, w, noise=philox_noise(1234, B, H, N), **kw)
    for name, a, b in zip(["out", "dq", "dk", "dv"], philox, debug):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    other = _run("triton", q, k, v, w, seed=1235, **kw)
    assert not torch.allclose(philox[0], other[0])


def test_philox_noise_is_standard_normal():
    z = philox_noise(7, 2, 3, 64)
    assert abs(z.mean().item()) < 5 / z.numel() ** 0.5
    assert abs(z.std().item() - 1) < 0.02
    flat = z.flatten()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]
    assert abs(corr.item()) < 0.03
    assert not torch.equal(z[0, 0], z[0, 1]) and not torch.equal(z[0], z[1])  # distinct streams per (b, h)


def test_triton_eval_deterministic():
    q, k, v, _ = _inputs(3)
    kw = dict(sigma_eh=1.0, training=False, impl="triton", **LAYOUTS["packing"])
    a = anaa_attention(q, k, v, **kw)
    assert torch.equal(a, anaa_attention(q, k, v, **kw))
    torch.testing.assert_close(a, anaa_attention(q, k, v, **{**kw, "impl": "factorized"}), **TOL)


def test_document_bounds_give_each_position_its_documents_range():
    """The kernels skip key (query) tiles outside [min start, max end) of a tile's documents; padding has the
    empty range (n, 0). Hand-computed."""
    from ehrfm.kernels.anaa.masks import document_bounds

    doc = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 4, 4, 0]])
    start, end = document_bounds(doc)
    assert start.tolist() == [[0, 0, 2, 2, 2, 7, 7], [0, 0, 0, 0, 4, 4, 7]]
    assert end.tolist() == [[2, 2, 5, 5, 5, 0, 0], [4, 4, 4, 4, 6, 6, 0]]


def _half_inputs(dtype):
    q, k, v, z = _inputs(3)
    return [t.to(dtype) for t in (q, k, v)], z


@pytest.mark.parametrize("layout", ["padding", "packing"])
def test_fp16_operands_match_reference(layout):
    """fp16 inputs are read as fp16 operands (P, dS and Z cast down before their dots, fp32 sums): within fp16
    rounding of the float64 reference, and measurably not the fp32-operand computation."""
    (q, k, v), z = _half_inputs(torch.float16)
    w = torch.randn(B, H, N, D)
    kw = dict(sigma_eh=1.0, variant="causal", training=True, noise=z, **LAYOUTS[layout])
    ref = _run("reference", q.double(), k.double(), v.double(), w.double(), **{**kw, "noise": z.double()})
    half = _run("triton", q, k, v, w.half(), **kw)
    for name, a, b in zip(["out", "dq", "dk", "dv"], half, ref):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 3e-3, name
    # the fused core's fp32 outputs: fp16 operands round P and Z before their dots, fp32 operands do not
    from ehrfm.kernels.anaa.triton_kernel import NOISE_EXPLICIT, _FusedANAA

    doc32 = LAYOUTS["packing"]["document_ids"].to(torch.int32)
    fused = [
        _FusedANAA.apply(*(t.to(dtype) for t in (q, k, v)), doc32, z, 0, True, NOISE_EXPLICIT, "ieee")
        for dtype in (torch.float16, torch.float32)
    ]
    for name, a, b in zip(["Y_A", "Y_Z"], *fused):  # r comes from the same fp16 q, k: identical
        assert ((a - b).abs().max() / b.abs().max()) > 1e-5, f"{name}: fp16 inputs were computed in fp32"


def test_bf16_inputs_on_the_interpreter_are_read_as_fp32():
    """numpy has no bfloat16: under the interpreter bf16 inputs go through the fp32 operand path (they returned
    values off by 1e9 when read as bf16)."""
    (q, k, v), z = _half_inputs(torch.bfloat16)
    w = torch.randn(B, H, N, D)
    kw = dict(sigma_eh=1.0, variant="causal", training=True, noise=z, **LAYOUTS["packing"])
    ref = _run("reference", q.double(), k.double(), v.double(), w.double(), **{**kw, "noise": z.double()})
    out = _run("triton", q, k, v, w.bfloat16(), **kw)
    for name, a, b in zip(["out", "dq", "dk", "dv"], out, ref):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 1e-2, name


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "half"), (torch.float16, "half"), (torch.float32, "fp32")])
@pytest.mark.parametrize("d,cls", [(16, 64), (64, 64), (128, 128)])
def test_gpu_autotuner_prunes_to_the_launch_candidates(dtype, kind, d, cls):
    """The GPU autotuner of each kernel times exactly the candidates of the launch's operand dtype and head dim."""
    from ehrfm.kernels.anaa import tiles, triton_kernel

    for kernel, arg in tiles.OPERAND_ARG.items():
        tuner = triton_kernel._autotuned(kernel)
        kept = tuner.early_config_prune(tuner.configs, {arg: torch.empty(0, dtype=dtype)}, BD=d)
        got = sorted((c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in kept)
        assert got == sorted(tiles.GPU_TILES[kernel][(kind, cls)])

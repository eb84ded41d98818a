"""Mamba2's pure-torch chunked SSD scan with document resets vs HF's chunked scan (values and gradients),
and resets vs running each document alone."""

import pytest
import torch
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from ehrfm.pretrain.models.mamba2 import ssd_chunk_scan


def make_inputs(batch=2, length=19, heads=4, head_dim=3, groups=2, state=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, length, heads, head_dim, generator=g),
        "dt": torch.randn(batch, length, heads, generator=g),
        "A": -torch.rand(heads, generator=g) - 0.2,
        "B": torch.randn(batch, length, groups, state, generator=g),
        "C": torch.randn(batch, length, groups, state, generator=g),
        "D": torch.randn(heads, generator=g),
        "dt_bias": torch.randn(heads, generator=g) * 0.3,
    }


def run(fn, inputs, upstream, chunk_size, **kwargs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = fn(
        leaves["x"],
        leaves["dt"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        chunk_size=chunk_size,
        D=leaves["D"],
        dt_bias=leaves["dt_bias"],
        **kwargs,
    )
    grads = torch.autograd.grad(y, list(leaves.values()), upstream)
    return y.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("chunk_size", [4, 8, 32])
def test_ssd_matches_hf_chunk_scan(chunk_size):
    inputs = make_inputs()
    upstream = torch.randn(2, 19, 4, 3, generator=torch.Generator().manual_seed(1))
    ours = run(ssd_chunk_scan, inputs, upstream, chunk_size)
    hf = run(mamba2_chunk_scan, inputs, upstream, chunk_size, dt_softplus=True)
    torch.testing.assert_close(ours[0], hf[0], atol=1e-5, rtol=1e-5)
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], hf[1][name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk_size", [4, 7])
def test_ssd_resets_equal_running_each_document_alone(chunk_size):
    inputs = make_inputs(seed=2)
    bounds = [[0, 5, 6, 19], [0, 12, 19]]  # includes a one-token document and boundaries inside chunks
    resets = torch.zeros(2, 19, dtype=torch.bool)
    for row, cuts in enumerate(bounds):
        resets[row, cuts[1:-1]] = True
    upstream = torch.randn(2, 19, 4, 3, generator=torch.Generator().manual_seed(3))
    packed_y, packed_grads = run(ssd_chunk_scan, inputs, upstream, chunk_size, resets=resets)
    assert all(torch.isfinite(g).all() for g in packed_grads.values())
    per_token = ("x", "dt", "B", "C")
    grads_alone = {k: torch.zeros_like(v) for k, v in inputs.items()}
    for row, cuts in enumerate(bounds):
        for start, end in zip(cuts[:-1], cuts[1:]):
            piece = {k: (v[row : row + 1, start:end] if k in per_token else v) for k, v in inputs.items()}
            y, grads = run(mamba2_chunk_scan, piece, upstream[row : row + 1, start:end], chunk_size, dt_softplus=True)
            torch.testing.assert_close(packed_y[row : row + 1, start:end], y, atol=1e-5, rtol=1e-5)
            for k, g in grads.items():
                if k in per_token:
                    grads_alone[k][row : row + 1, start:end] += g
                else:
                    grads_alone[k] += g
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], grads_alone[name], atol=1e-4, rtol=1e-4, msg=name)


def test_ssd_stays_float32_under_bf16_autocast():
    """Documented float32: the einsums must not drop to bf16 under autocast (before the fix they did: every
    output element differed). Forward under autocast, backward outside it, as the training loop does."""
    inputs = make_inputs(batch=2, length=40, heads=4, head_dim=8, groups=2, state=16, seed=9)
    resets = torch.zeros(2, 40, dtype=torch.bool)
    resets[1, 17] = True
    upstream = torch.randn(2, 40, 4, 8, generator=torch.Generator().manual_seed(10))
    expected = run(ssd_chunk_scan, inputs, upstream, 8, resets=resets)

    def under_autocast(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ssd_chunk_scan(*args, **kwargs)

    got = run(under_autocast, inputs, upstream, 8, resets=resets)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-6)
    for name in got[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], atol=1e-6, rtol=1e-6)

"""Mamba2's chunked SSD scan with document resets vs its sequential reference and HF's chunked scan (values
and gradients), resets vs running each document alone, and the dispatch to mamba_ssm's fused scan."""

import pytest
import torch
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from ehrfm.kernels.mamba_scan import ssd as ssd_module
from ehrfm.kernels.mamba_scan import ssd_chunk_scan, ssd_scan_reference


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


def reference(x, dt, A, B, C, chunk_size, **kwargs):
    return ssd_scan_reference(x, dt, A, B, C, **kwargs)


@pytest.mark.parametrize("chunk_size", [4, 7, 32])
def test_chunked_scan_equals_the_sequential_reference_with_resets_and_dt_limit(chunk_size):
    inputs = make_inputs(seed=4)
    resets = torch.zeros(2, 19, dtype=torch.bool)
    resets[0, [3, 4, 11]] = True
    resets[1, [7]] = True
    upstream = torch.randn(2, 19, 4, 3, generator=torch.Generator().manual_seed(5))
    for extra in ({}, {"resets": resets}, {"resets": resets, "dt_limit": (0.05, 0.8)}):
        got = run(ssd_chunk_scan, inputs, upstream, chunk_size, **extra)
        expected = run(reference, inputs, upstream, chunk_size, **extra)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        for name in got[1]:
            torch.testing.assert_close(got[1][name], expected[1][name], atol=1e-4, rtol=1e-4, msg=name)


def test_reference_by_hand_one_head_one_state():
    """x = 1, B = C = 1, A = -ln 2 and softplus(dt) = 1 (raw dt = ln(e - 1)): h_t = h_{t-1} / 2 + 1, so
    y = 1, 1.5, 1.75 before a reset at t = 3 and 1, 1.5 after it (D = 0)."""
    ones = torch.ones(1, 5, 1, 1)
    dt = torch.full((1, 5, 1), float(torch.log(torch.expm1(torch.tensor(1.0)))))
    A = -torch.log(torch.tensor([2.0]))
    resets = torch.tensor([[False, False, False, True, False]])
    y = ssd_scan_reference(ones, dt, A, ones, ones, resets=resets)
    torch.testing.assert_close(y.flatten(), torch.tensor([1.0, 1.5, 1.75, 1.0, 1.5]))


def test_cuda_dispatch_passes_documents_as_seq_idx(monkeypatch):
    """On CUDA with mamba_ssm installed the fused scan gets the packed documents as seq_idx (the state resets
    where seq_idx changes); a stand-in with that rule must reproduce the reset scan."""
    calls = []

    def fused(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, seq_idx=None, dt_softplus=False, dt_limit=None):
        assert dt_softplus and seq_idx.dtype == torch.int32
        calls.append(seq_idx)
        changes = torch.zeros_like(seq_idx, dtype=torch.bool)
        changes[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        return ssd_scan_reference(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_limit=dt_limit, resets=changes)

    monkeypatch.setattr(ssd_module, "_mamba_ssm_chunk_scan", fused)
    monkeypatch.setattr(ssd_module, "_fused_scan_applies", lambda x: True)
    inputs = make_inputs(seed=6)
    resets = torch.zeros(2, 19, dtype=torch.bool)
    resets[0, [5, 6]] = True
    upstream = torch.randn(2, 19, 4, 3, generator=torch.Generator().manual_seed(7))
    got = run(ssd_chunk_scan, inputs, upstream, 8, resets=resets)
    expected = run(reference, inputs, upstream, 8, resets=resets)
    assert len(calls) == 1
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)

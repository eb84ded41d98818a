"""Fast Mamba v1 selective scan vs HF's sequential reference (values and gradients) and document resets vs
running each document alone."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mamba.modeling_mamba import mamba_selective_scan as _hf_scan

from ehrfm.kernels.mamba_scan import scan as scan_module
from ehrfm.kernels.mamba_scan import selective_scan, selective_scan_reference


def mamba_selective_scan(u, delta, A, B, C, **kwargs):
    """HF's sequential torch path (the reference its MambaMixer falls back to without mamba_ssm)."""
    return _hf_scan(u, delta, A, B, C, **kwargs)


def make_inputs(batch=2, channels=6, state=4, length=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, channels, length, generator=g),
        "delta": torch.randn(batch, channels, length, generator=g),
        "A": -torch.rand(channels, state, generator=g) * 2 - 0.1,
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.randn(channels, generator=g),
        "z": torch.randn(batch, channels, length, generator=g),
        "delta_bias": torch.randn(channels, generator=g) * 0.5,
    }


def values_and_grads(fn, inputs, upstream, **kwargs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True, **kwargs)
    grads = torch.autograd.grad(y, list(leaves.values()), upstream)
    return y.detach(), dict(zip(leaves, grads))


def assert_close_all(a, b, atol=1e-5, rtol=1e-5):
    y_a, g_a = a
    y_b, g_b = b
    torch.testing.assert_close(y_a, y_b, atol=atol, rtol=rtol)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=atol, rtol=rtol, msg=f"grad of {name}")


def test_scan_matches_hf_reference_values_and_grads():
    inputs = make_inputs()
    upstream = torch.randn(2, 6, 17, generator=torch.Generator().manual_seed(1))
    ours = values_and_grads(selective_scan, inputs, upstream)
    hf = values_and_grads(mamba_selective_scan, inputs, upstream)
    assert_close_all(ours, hf)


def test_reference_matches_hf_reference():
    inputs = make_inputs(seed=3)
    upstream = torch.randn(2, 6, 17, generator=torch.Generator().manual_seed(4))
    assert_close_all(
        values_and_grads(selective_scan_reference, inputs, upstream),
        values_and_grads(mamba_selective_scan, inputs, upstream),
    )


def test_resets_equal_running_each_document_alone():
    inputs = make_inputs(batch=2, length=20, seed=5)
    # row 0: documents [0, 7) [7, 12) [12, 20); row 1: [0, 15) [15, 20)
    bounds = [[0, 7, 12, 20], [0, 15, 20]]
    resets = torch.zeros(2, 20, dtype=torch.bool)
    for row, cuts in enumerate(bounds):
        resets[row, cuts[1:-1]] = True
    upstream = torch.randn(2, 6, 20, generator=torch.Generator().manual_seed(6))
    ours = values_and_grads(selective_scan, inputs, upstream, resets=resets)
    ref = values_and_grads(selective_scan_reference, inputs, upstream, resets=resets)
    assert_close_all(ours, ref)

    # independent oracle: HF's scan run on each document separately
    per_token = ("u", "delta", "B", "C", "z")
    for row, cuts in enumerate(bounds):
        for start, end in zip(cuts[:-1], cuts[1:]):
            piece = {k: (v[row : row + 1, ..., start:end] if k in per_token else v) for k, v in inputs.items()}
            y = mamba_selective_scan(**piece, delta_softplus=True)
            torch.testing.assert_close(ours[0][row : row + 1, :, start:end], y, atol=1e-5, rtol=1e-5)
    # the reset must matter: without it the outputs after the first boundary differ
    no_reset = values_and_grads(selective_scan, inputs, upstream)[0]
    assert not torch.allclose(no_reset[0, :, 7:], ours[0][0, :, 7:], atol=1e-3)


def test_channel_blocking_gives_the_same_result(monkeypatch):
    inputs = make_inputs(batch=2, channels=10, length=9, seed=7)
    upstream = torch.randn(2, 10, 9, generator=torch.Generator().manual_seed(8))
    resets = torch.zeros(2, 9, dtype=torch.bool)
    resets[1, 4] = True
    whole = values_and_grads(selective_scan, inputs, upstream, resets=resets)
    monkeypatch.setattr(scan_module, "_BLOCK_ELEMENTS", 9 * 2 * 4 * 3)  # 3 channels per block
    assert scan_module._channel_block(9, 2, 10, 4) == 3
    blocked = values_and_grads(selective_scan, inputs, upstream, resets=resets)
    assert_close_all(whole, blocked, atol=1e-6, rtol=1e-6)


def test_bf16_inputs_are_computed_in_fp32():
    inputs = make_inputs(seed=9)
    y16 = selective_scan(**{k: v.bfloat16() for k, v in inputs.items()}, delta_softplus=True)
    y32 = selective_scan(**{k: v.bfloat16().float() for k, v in inputs.items()}, delta_softplus=True)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("kernel", [2, 4])
def test_masked_causal_conv_equals_per_document_conv(kernel):
    from ehrfm.pretrain.models.ssm import causal_depthwise_conv

    g = torch.Generator().manual_seed(10)
    x, weight, bias = torch.randn(1, 3, 12, generator=g), torch.randn(3, 1, kernel, generator=g), torch.randn(3)
    docs = torch.tensor([[1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 0]])
    out = causal_depthwise_conv(x, weight, bias, docs)
    for start, end in [(0, 4), (4, 6), (6, 11), (11, 12)]:
        alone = F.conv1d(x[..., start:end], weight, bias, padding=kernel - 1, groups=3)[..., : end - start]
        torch.testing.assert_close(out[..., start:end], alone)
    torch.testing.assert_close(
        causal_depthwise_conv(x, weight, bias, None), causal_depthwise_conv(x, weight, bias, torch.ones_like(docs))
    )


def test_mixer_matches_hf_mamba_mixer_values_and_grads():
    """The whole EhrMambaMixer (fast scan path) vs HF's MambaMixer (its torch reference path), with padding."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from ehrfm.pretrain.models.configuration import EhrMambaConfig
    from ehrfm.pretrain.models.mamba import EhrMambaMixer

    torch.manual_seed(0)
    config = EhrMambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1)
    ours, theirs = EhrMambaMixer(config, layer_idx=0), MambaMixer(config, layer_idx=0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 11, 16)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    upstream = torch.randn(2, 11, 16)
    results = []
    for mixer in (ours, theirs):
        leaf = x.clone().requires_grad_(True)
        y = mixer(leaf, attention_mask=mask)
        torch.autograd.backward(y, upstream)
        results.append((y.detach(), leaf.grad, {n: p.grad for n, p in mixer.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(grad, results[1][2][name], atol=1e-5, rtol=1e-5, msg=name)


def _fake_cuda_kernel(calls):
    """Stands in for mamba_ssm's selective_scan_fn: the CUDA op's input rules (no resets, D and delta_bias in
    float32), then the reference scan."""

    def kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        assert D is None or D.dtype == torch.float32, f"D is {D.dtype}: the CUDA op takes float32 only"
        assert delta_bias is None or delta_bias.dtype == torch.float32, f"delta_bias is {delta_bias.dtype}"
        calls.append(tuple(u.shape))
        return selective_scan_reference(u.float(), delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype)

    return kernel


def _packed_resets(batch=3, length=23):
    """Rows of several documents of different lengths (the third row is one document)."""
    resets = torch.zeros(batch, length, dtype=torch.bool)
    resets[0, [5, 9, 10, 20]] = True
    resets[1, [12]] = True
    return resets


def test_cuda_path_on_packed_rows_runs_one_document_per_row(monkeypatch):
    """Packed rows reach the CUDA kernel (re-packed one document per row, then scattered back) and give the
    reset scan's values and gradients; D / delta_bias arrive in float32 although the parameters are bf16.
    Before the fix packed rows never reached the kernel, and bf16 D reached it unconverted."""
    calls = []
    monkeypatch.setattr(scan_module, "_mamba_ssm_scan", _fake_cuda_kernel(calls))
    inputs = make_inputs(batch=3, length=23, seed=5)
    resets = _packed_resets()
    upstream = torch.randn(3, 6, 23, generator=torch.Generator().manual_seed(6))
    expected = values_and_grads(selective_scan_reference, inputs, upstream, resets=resets)
    monkeypatch.setattr(scan_module, "_cuda_kernel_applies", lambda u: True)
    got = values_and_grads(selective_scan, inputs, upstream, resets=resets)
    assert calls and all(shape[0] > 3 or shape[2] < 23 for shape in calls), calls  # documents, not packed rows
    assert_close_all(got, expected)
    bf16 = {**inputs, "D": inputs["D"].bfloat16(), "delta_bias": inputs["delta_bias"].bfloat16()}
    selective_scan(**bf16, delta_softplus=True, resets=resets)
    selective_scan(**bf16, delta_softplus=True)


@pytest.mark.parametrize("budget", [1, 23, 69, 1000])
def test_split_documents_places_every_token_once(budget):
    resets = _packed_resets()
    seen = torch.zeros(3, 23, dtype=torch.long)
    for rows, steps, slots, width in scan_module.split_documents(resets, budget):
        seen[rows, steps] += 1
        docs = torch.cumsum(resets.long(), 1)[rows, steps]
        # within a grid row the tokens are one document, in order, starting at position 0
        for slot_row in torch.unique(slots // width):
            mine = slots // width == slot_row
            assert torch.unique(docs[mine]).numel() == 1 and torch.unique(rows[mine]).numel() == 1
            assert sorted((slots[mine] % width).tolist()) == list(range(int(mine.sum())))
            assert torch.equal(steps[mine].sort().values, steps[mine][torch.argsort(slots[mine])])
    assert torch.equal(seen, torch.ones_like(seen))


def test_cpu_scan_stays_float32_under_bf16_autocast():
    """Documented float32: under bf16 autocast the CPU scan's matmuls must not drop to bf16 (before the fix:
    relative error about 4e-3 on values)."""
    inputs = make_inputs(batch=2, channels=16, state=16, length=64, seed=7)
    resets = torch.zeros(2, 64, dtype=torch.bool)
    resets[0, 30] = True
    upstream = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(8))
    expected = values_and_grads(selective_scan, inputs, upstream, resets=resets)

    def under_autocast(**kwargs):  # forward under autocast, backward outside it (as the training loop)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return selective_scan(**kwargs)

    got = values_and_grads(under_autocast, inputs, upstream, resets=resets)
    assert_close_all(got, expected, atol=1e-6, rtol=1e-6)

"""Section 5.8 diagnostics on a tiny random Llama: captured maps are the model's softmax attention, histogram
and distance statistics are consistent, PNGs are written, and the model's attention is restored."""

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ehrfm.finetune.anaa import ANAAConfig, enable_anaa
from ehrfm.finetune.attention_diagnostics import capturing, median_by_distance, save_diagnostics, scaled_histograms


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=30,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )


def _batches():
    g = torch.Generator().manual_seed(1)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    return [dict(input_ids=torch.randint(0, 30, (2, 9), generator=g), attention_mask=am) for _ in range(2)]


def test_capture_returns_model_outputs_and_softmax_rows():
    model = _model().eval()
    batch = _batches()[0]
    ref = model(**batch).logits
    with capturing(model) as rec:
        out = model(**batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # capture path == sdpa
    assert model.config._attn_implementation == "sdpa"
    A, allowed = rec.maps[0]
    assert A.shape == (2, 2, 9, 9)
    torch.testing.assert_close(A[0].sum(-1), torch.ones(2, 9))
    assert (A[:, :, torch.triu_indices(9, 9, 1)[0], torch.triu_indices(9, 9, 1)[1]] == 0).all()  # causal


def test_statistics_and_pngs(tmp_path):
    model = _model()
    handle = enable_anaa(model, ANAAConfig(sigma_eh=1.0))  # diagnostics work on an ANAA-swapped model too
    res = save_diagnostics(model, _batches(), tmp_path, label="tiny", bins=10)
    assert model.config._attn_implementation == "ehrfm_anaa"
    handle.remove()
    for key in ("histograms_png", "distance_png"):
        data = open(res[key], "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    # entries per head: 2 batches x (row 0: 9*10/2 causal pairs, row 1: 6*7/2 valid pairs)
    assert res["counts"].shape == (2, 2, 10)
    assert (res["counts"].sum(-1) == 2 * (45 + 21)).all()
    ds, med = res["medians"][0]
    assert ds.min() == 0 and ds.max() == 8  # causal: only earlier events
    assert np.all((med >= 0) & (med <= 1))


def test_histogram_and_median_known_answers():
    scores = [[np.array([0.0, 0.5, 1.0, 1.0]), np.array([2.0, 2.0, 4.0, 3.0])]]
    counts, edges = scaled_histograms(scores, bins=2)
    assert counts.tolist() == [[[1, 3], [2, 2]]]
    ((ds, med),) = median_by_distance([{0: np.array([1.0, 0.2, 0.4]), 1: np.array([0.1, 0.3])}])
    assert ds.tolist() == [0, 1] and np.allclose(med, [0.4, 0.2])

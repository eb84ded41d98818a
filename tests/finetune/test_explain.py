"""`ehrfm explain`: integrated gradients are complete (attributions sum to the logit minus the baseline logit),
codes are aggregated over rows, and the outputs a clinician reads are written."""

from __future__ import annotations

import json

import polars as pl
import torch

from ehrfm.cli import main
from ehrfm.finetune.data import FinetuneDataset, collate
from ehrfm.finetune.explain import COMPLETENESS_TOLERANCE, attention_maps, integrated_gradients
from ehrfm.finetune.model import load_finetuned


def test_explain_is_complete_and_writes_its_outputs(llama_export, ft_data, tasks, tmp_path):
    ft, out = tmp_path / "ft", tmp_path / "explain"
    finetune = ["finetune", "--model", str(llama_export), "--data", str(ft_data), "--out", str(ft)]
    assert main([*finetune, "--method", "per-task", "--epochs", "1", "--context-length", "32", "dropout=0.0"]) == 0
    task = tasks[0]
    args = ["explain", "--model", str(ft), "--data", str(ft_data), "--task", task, "--out", str(out)]
    assert main([*args, "--rows", "6", "--steps", "48", "--min-count", "1", "--patients", "2"]) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert summary["rows"] == 6 and summary["completeness"]["share_within_tolerance"] == 1.0
    codes = pl.read_parquet(out / "codes.parquet")
    assert codes.height > 0 and (codes["occurrences"] >= codes["patients"]).all()
    structural = codes.filter(pl.col("code").str.starts_with("[") & (pl.col("code") != "[UNK]"))
    assert structural.height == 0  # special tokens are not codes ([UNK] stands for rare codes)
    assert (out / "top_codes.png").stat().st_size > 0
    page = (out / "patients" / "0.html").read_text()
    assert "<span" in page and "attribution" in page
    assert summary["attention_maps"] == ["attention/0.png", "attention/1.png"]
    assert (out / "attention" / "0.png").read_bytes()[:4] == b"\x89PNG"

    # completeness by hand: the sum of a row's attributions equals f(x) - f(baseline) within the tolerance
    model, meta = load_finetuned(ft)
    model.eval()
    dataset = FinetuneDataset(ft_data, meta["tasks"], "test", meta["context_length"])
    batch = collate([dataset[i] for i in range(3)])
    per_token, difference, _ = integrated_gradients(model, batch, steps=48)
    baseline = model({**batch, "input_ids": torch.zeros_like(batch["input_ids"])})["logits"]
    actual = model(batch)["logits"]
    torch.testing.assert_close(difference, (actual - baseline).detach(), atol=1e-5, rtol=1e-5)
    error = (per_token.sum(1) - difference).abs()
    assert (error <= COMPLETENESS_TOLERANCE * difference.abs() + 1e-3).all(), (error, difference)


def test_attention_maps_are_the_models_own_causal_distributions(llama_export, export_factory, ft_data, tasks, tmp_path):
    """The captured maps: one per layer, (B, heads, L, L), rows summing to 1 over real keys, nothing above the
    diagonal (causal), and capturing leaves the model's output unchanged."""
    ft = tmp_path / "ft"
    finetune = ["finetune", "--model", str(llama_export), "--data", str(ft_data), "--out", str(ft)]
    assert main([*finetune, "--method", "per-task", "--epochs", "1", "--context-length", "32", "dropout=0.0"]) == 0
    model, meta = load_finetuned(ft)
    model.eval()
    batch = collate([FinetuneDataset(ft_data, meta["tasks"], "test", meta["context_length"])[i] for i in range(2)])
    before = model(batch)["logits"].detach()
    maps = attention_maps(model, batch)
    torch.testing.assert_close(model(batch)["logits"].detach(), before)
    config = model.backbone.config
    assert len(maps) == config.num_hidden_layers
    length = batch["input_ids"].shape[1]
    assert all(m.shape == (2, config.num_attention_heads, length, length) for m in maps)
    real = batch["attention_mask"].bool().numpy()
    for m in maps:
        rows = m.sum(-1)  # (B, H, L)
        assert abs(rows[real[:, None, :].repeat(m.shape[1], 1)] - 1).max() < 1e-5
        assert abs(m * torch.ones(length, length).triu(1).numpy()).max() == 0.0  # causal

    mamba = export_factory(tmp_path / "mamba", ft_data, "mamba")
    ft_mamba, out = tmp_path / "ft_mamba", tmp_path / "explain_mamba"
    finetune = ["finetune", "--model", str(mamba), "--data", str(ft_data), "--out", str(ft_mamba)]
    assert main([*finetune, "--method", "per-task", "--epochs", "1", "--context-length", "32"]) == 0
    args = ["explain", "--model", str(ft_mamba), "--data", str(ft_data), "--task", tasks[0], "--out", str(out)]
    assert main([*args, "--rows", "2", "--steps", "8", "--min-count", "1", "--patients", "1"]) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert summary["attention_maps"].startswith("none") and not (out / "attention").exists()

"""`ehrfm compare`: 001's table layout and plots, untrained exports, and a small preset end to end (resumes)."""

from __future__ import annotations

import json

import pytest

from ehrfm.apps.compare import PRESETS, Row, Settings, compare_plots, compare_table, run_rows


def _entry(value):
    return {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05}


def _record(name, auroc):
    metrics = {"auroc": _entry(auroc), "auprc": _entry(0.4), "best_f1": _entry(0.3)}
    return {
        "cell": name,
        "architecture": None if name == "XGBoost" else "mamba",
        "pretrained": True,
        "method": "mpf",
        "separate_tasks": False,
        "context": 512,
        "size": "tiny",
        "seconds": 3.0,
        "tasks": {"mortality_1y": metrics},
    }


def test_table_has_001_layout_and_every_metric_row(tmp_path):
    records = [_record("XGBoost", 0.61), _record("EhrMamba", 0.72)]
    table = compare_table(records, ["mortality_1y", "los_7d"], "# header")
    lines = table.splitlines()
    assert lines[2] == "| Metric | XGBoost | EhrMamba |"
    i = lines.index("| **mortality_1y** | | |")
    assert lines[i + 1] == "| AUROC | 0.610 (0.560-0.660) | 0.720 (0.670-0.770) |"
    assert lines[i + 2].startswith("| AUPRC | 0.400 (0.350-0.450)")
    assert lines[i + 3].startswith("| F1-Score | 0.300 (0.250-0.350)")
    # a task a model has no result for shows n/a, not a crash
    j = lines.index("| **los_7d** | | |")
    assert lines[j + 1] == "| AUROC | n/a | n/a |"
    plots = compare_plots(records, ["mortality_1y"], tmp_path)
    assert [p.name for p in plots] == ["compare_auroc.png", "compare_auprc.png", "compare_best_f1.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots)


def test_the_ehrmamba_preset_is_001_table_1():
    rows = {r.name: r for r in PRESETS["ehrmamba"]}
    assert list(rows) == ["XGBoost", "LSTM", "CEHR-BERT", "BigBird", "MultiBird", "EhrMamba"]
    assert not rows["LSTM"].pretrained and rows["LSTM"].separate_tasks
    assert rows["MultiBird"].architecture == rows["BigBird"].architecture == "bigbird"
    assert rows["MultiBird"].method == rows["EhrMamba"].method == "mpf"
    assert not rows["MultiBird"].separate_tasks and rows["BigBird"].separate_tasks
    settings = Settings(context_scale=0.25)
    assert [settings.context(rows[n]) for n in ("CEHR-BERT", "BigBird")] == [128, 512]  # 001's 4:1 kept
    # MultiBird reuses BigBird's pretraining run
    assert settings.pretrain_key(rows["MultiBird"]) == settings.pretrain_key(rows["BigBird"])


def test_untrained_export_loads_and_refuses_a_foreign_folder(ft_data, tmp_path):
    from transformers import AutoModel

    from ehrfm.errors import EhrfmError
    from ehrfm.pretrain.export import export_untrained

    out = export_untrained("llama", "mini", ft_data, tmp_path / "hf", seed=3)
    meta = json.loads((out / "ehrfm_export.json").read_text())
    assert meta["pretrained"] is False and meta["step"] == 0
    assert meta["vocab_fingerprint"] == json.loads((ft_data / "manifest.json").read_text())["vocab_fingerprint"]
    model = AutoModel.from_pretrained(str(out))
    assert model.config.vocab_size == json.loads((ft_data / "manifest.json").read_text())["vocab_size"]
    again = export_untrained("llama", "mini", ft_data, tmp_path / "hf2", seed=3)
    a = AutoModel.from_pretrained(str(again)).state_dict()
    assert all((a[k] == v).all() for k, v in model.state_dict().items())  # seeded
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(EhrfmError):
        export_untrained("llama", "mini", ft_data, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_small_preset_runs_end_to_end_and_resumes(ft_data, tasks, tmp_path):
    rows = (
        Row("XGBoost", None),
        Row("Scratch", "llama", pretrained=False, context=64, epochs=1),  # one model per task, from scratch
        Row("Pretrained-MPF", "mamba", method="mpf", separate_tasks=False, context=64, epochs=1),
    )
    settings = Settings(size="mini", steps=2, batch_size=2, n_boot=20)
    out = tmp_path / "cmp"
    records = run_rows(ft_data, out, rows, settings, tasks)
    assert [r["cell"] for r in records] == ["XGBoost", "Scratch", "Pretrained-MPF"]
    for r in records:
        assert set(r["tasks"]) == set(tasks), r["cell"]
        assert all(0.0 <= r["tasks"][t]["auroc"]["value"] <= 1.0 for t in tasks)
    # per-task rows hold one finetuned model per task; MPF one for all
    assert all((out / "cells" / "Scratch" / t / "finetune" / "finetune.json").exists() for t in tasks)
    assert (out / "cells" / "Pretrained-MPF" / "finetune" / "finetune.json").exists()
    assert json.loads((out / "exported" / "llama-mini-C64" / "ehrfm_export.json").read_text())["pretrained"] is False
    assert (out / "runs" / "mamba-mini-C64" / "PRETRAIN_COMPLETE").exists()
    lines = (out / "results.jsonl").read_text().splitlines()
    again = run_rows(ft_data, out, rows, settings, tasks)  # resumes: nothing re-runs, nothing appended
    assert [r["cell"] for r in again] == [r["cell"] for r in records]
    assert (out / "results.jsonl").read_text().splitlines() == lines

"""`ehrfm ablate` grid logic, tables and plots; `ehrfm demo` and `ehrfm ablate --quick` end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ehrfm.apps.ablate import (
    BASE_VALUES,
    ablation_plots,
    ablation_tables,
    base_only,
    cells,
    concept_groups,
    full_grid,
    quick_grid,
)
from ehrfm.apps.demo import chance_verdict
from ehrfm.apps.study import benefit_plots, benefit_table, convergence_rows, convergence_table

TASKS_YAML = Path(__file__).parent / "finetune" / "tasks_synthea.yaml"
SMALL_SPLITS = [
    "splits.pretrain=0.2",
    "splits.finetune=0.5",
    "splits.test=0.3",
    "splits.val_fraction=0.4",
    "splits.seed=1",
]


def test_each_axis_varies_alone_around_the_base():
    grid = full_grid(steps=10, epochs=1)
    all_cells = cells(grid)
    base = {"data_variant": "b10-i3_cutoff_PRO", "context": 512, "size": "medium", "train_fraction": 1.0}
    for c in all_cells:
        differing = {k for k, v in base.items() if getattr(c, k) != v}
        allowed = {
            "vocabulary": {"data_variant"},
            "history": {"data_variant"},
            "concepts": {"data_variant"},
            "context-size": {"context", "size"},
            "train-fraction": {"train_fraction"},
        }[c.axis]
        assert differing <= allowed, c
    # 6 backbones (003's columns) x (4 + 9 + 6 + 5 + 4) values, XGBoost per data variant (+ once for
    # context/size and fractions)
    assert grid.backbones == ("bert", "xlnet", "modernbert", "llama", "mamba", "mamba2")
    backbone_cells = [c for c in all_cells if c.model != "xgboost"]
    assert len(backbone_cells) == 6 * 28
    assert len([c for c in all_cells if c.model == "xgboost"]) == 4 + 1 + 6 + 5 + 1
    # the base setting appears under every axis but is one experiment per model
    base_keys = {
        c.experiment_key for c in all_cells if c.value in (*BASE_VALUES.values(), "C512-medium") and c.model == "llama"
    }
    assert len(base_keys) == 1
    # --base-only: the same base experiment per model, under every axis, and nothing else
    base_cells = cells(base_only(grid))
    assert {c.experiment_key for c in base_cells if c.model != "xgboost"} == {
        c.experiment_key
        for c in all_cells
        if c.model != "xgboost" and c.value in (*BASE_VALUES.values(), "C512-medium")
    }
    assert len({c.experiment_key for c in base_cells}) == 6 + 1 and len({c.axis for c in base_cells}) == 5
    assert concept_groups("DX") == ["DX", "IMM", "OTHER"]
    assert concept_groups("+MED") == ["DX", "VIT", "LAB", "MED", "IMM", "OTHER"]


def _metric(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high}


def _record(axis, value, model, auprc):
    entry = {
        "auprc": _metric(auprc, auprc - 0.1, auprc + 0.1),
        "auroc": _metric(0.7, 0.6, 0.8),
        "brier": _metric(0.2, 0.15, 0.25),
    }
    return {
        "cell": f"{axis}={value}/{model}",
        "axis": axis,
        "value": value,
        "model": model,
        "vocab_size": 99,
        "tasks": {"los_7d": entry},
    }


def test_tables_follow_the_supplementary_layout_and_plots_are_pngs(tmp_path):
    grid = quick_grid(steps=1, epochs=1)
    records = [
        _record("vocabulary", "b5-i3", "llama", 0.41),
        _record("vocabulary", "b10-i3", "llama", 0.52),
        _record("vocabulary", "b10-i3", "xgboost", 0.33),
        _record("train-fraction", "50%", "llama", 0.5),
    ]
    records[-1]["tasks"] = {}
    records[0]["tasks"]["los_7d"]["brier"] = _metric(0.2, 0.2 + 1e-16, 0.25)  # a CI above its point by rounding
    records[-1]["skipped_tasks"] = {"los_7d": "task 'los_7d': train_fraction 0.5 leaves only one class"}
    text = ablation_tables(records, grid)
    assert "| los_7d | 50% | 99 | - | - | - |" in text
    assert "- train-fraction=50%/llama: task 'los_7d': train_fraction 0.5 leaves only one class" in text
    assert "## vocabulary: AUPRC" in text and "| task | vocabulary | vocab | xgboost | llama | mamba |" in text
    assert "| los_7d | b10-i3* | 99 | 0.330 (0.230-0.430) | 0.520 (0.420-0.620) | - |" in text
    assert "| los_7d | b5-i3 | 99 | - | 0.410 (0.310-0.510) | - |" in text
    plots = ablation_plots(records, tmp_path)
    assert {p.name for p in plots} == {
        f"ablation_{a}_{m}.png" for a in ("vocabulary", "train-fraction") for m in ("auprc", "auroc", "brier")
    }
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_chance_verdict_counts_auroc_and_ci_lower_bounds():
    metrics = {
        "tasks": {
            "a": {"auroc": _metric(0.8, 0.6, 0.9)},
            "b": {"auroc": _metric(0.7, 0.55, 0.85)},
            "c": {"auroc": _metric(0.52, 0.3, 0.7)},
        }
    }
    verdict = chance_verdict(metrics, ["a", "b", "c"])
    assert verdict["met"] and verdict["above"] == ["a", "b", "c"] and verdict["ci_above"] == ["a", "b"]
    metrics["tasks"]["c"]["auroc"] = _metric(0.49, 0.3, 0.7)  # one task at or below chance fails the criterion
    assert not chance_verdict(metrics, ["a", "b", "c"])["met"]
    metrics["tasks"]["c"]["auroc"] = _metric(float("nan"), float("nan"), float("nan"))  # undefined is not above
    assert chance_verdict(metrics, ["a", "b", "c"])["above"] == ["a", "b"]
    assert not chance_verdict(
        {"tasks": {"a": {"auroc": _metric(0.9, 0.45, 0.99)}, "b": {"auroc": _metric(0.9, 0.6, 1)}}}, ["a", "b"]
    )["met"]  # with two tasks both lower bounds must clear 0.5


def test_benefit_table_and_plots(tmp_path):
    def record(model, fraction, auroc):
        entry = {"auroc": _metric(auroc, auroc - 0.1, auroc + 0.1), "auprc": _metric(0.3, 0.2, 0.4)}
        return {
            "cell": f"{model}-f{round(fraction * 100)}",
            "model": model,
            "fraction": fraction,
            "tasks": {"los_7d": entry},
            "skipped_tasks": {},
            "train_patients": round(200 * fraction),
        }

    records = [
        record(m, f, a) for f in (0.1, 1.0) for m, a in (("pretrained", 0.7), ("from scratch", 0.6), ("xgboost", 0.65))
    ]
    records[0]["skipped_tasks"] = {"readmission_30d": "task 'readmission_30d': one class"}
    text = benefit_table(records, ["los_7d"])
    assert "## AUROC" in text and "## AUPRC" in text
    assert "| los_7d | 10% | 20 | 0.700 (0.600-0.800) | 0.600 (0.500-0.700) | 0.650 (0.550-0.750) |" in text
    assert "- pretrained-f10: task 'readmission_30d': one class" in text
    plots = benefit_plots(records, ["los_7d"], tmp_path)
    assert [p.name for p in plots] == ["pretraining_benefit_auroc.png", "pretraining_benefit_auprc.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_convergence_rows_find_the_first_step_below_the_bigram(tmp_path):
    from ehrfm.pretrain.curves import plot_validation_curves

    run = tmp_path / "run"
    run.mkdir()
    refs = {"ref_unigram_ppl": 300.0, "ref_bigram_ppl": 5.6, "ref_code_unigram_ppl": 430.0, "ref_code_bigram_ppl": 7.6}
    lines = [{"loss": 5.0, "step": 1, "step_time_s": 0.5}, {"loss": 4.0, "step": 2, "step_time_s": 0.25}]
    lines += [
        {"split": "val", "step": s, "val_loss": 0.0, "val_ppl": v, "val_code_ppl": v * 1.3, **refs}
        for s, v in ((50, 100.0), (100, 6.0), (150, 5.0), (200, 4.5))
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = convergence_rows({"llama-mini": run, "empty": tmp_path / "missing"})
    assert len(rows) == 1 and rows[0]["first_step_below_bigram"] == 150 and rows[0]["best_val_ppl"] == 4.5
    assert rows[0]["seconds"] == 0.8
    assert "| llama-mini | 200 | 4.50 | 4.50 | 5.85 | 300.00 | 5.60 | 430.00 | 7.60 | 150 | 1 |" in convergence_table(
        rows
    )
    png = plot_validation_curves({"llama-mini": run}, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_validation_curves({"none": tmp_path / "missing"}, tmp_path / "none.png") is None


def _ehrfm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ehrfm")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def cohort() -> Path:
    from ehrfm.data_shards.synthea import generate_cohort

    return generate_cohort(6, seed=11, age="55-90", threads=1, progress=False)


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(cohort, tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--input",
        str(cohort),
        "--format",
        "fhir",
        "--tasks",
        str(TASKS_YAML),
        "--out",
        str(out),
        "--steps",
        "4",
        "--context-length",
        "64",
        "--epochs",
        "1",
        "--bootstrap",
        "20",
        *[f"--prepare-option={o}" for o in SMALL_SPLITS],
    ]
    first = _ehrfm(*args, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "demo_report.json").read_text())
    assert set(report["results"]) == {
        "llama-mini per-task heads",
        "llama-mini per-task heads, from scratch",
        "llama-mini zero-shot (K=10)",
        "XGBoost (counts)",
    }
    zero_shot = json.loads((out / "zero_shot_llama" / "forecast.json").read_text())
    assert set(zero_shot["tasks"]) == set(report["tasks"]) and zero_shot["config"]["sampling"]["samples"] == 10
    pretraining = report["pretraining"]["llama"]
    assert pretraining["val_ppl"] > 0 and pretraining["ref_bigram_ppl"] > 0 and pretraining["ref_unigram_ppl"] > 0
    assert pretraining["val_code_ppl"] > 0 and pretraining["ref_code_bigram_ppl"] > 0
    assert "bigram" in first.stdout and "llama-mini per-task heads vs chance: AUROC > 0.5 on" in first.stdout
    assert report["recipe"]["size"] == "mini" and report["chance"]["llama"]["met"] in (True, False)
    assert json.loads((out / "finetune_llama_scratch" / "finetune.json").read_text())["init"] == "random"
    for model, tasks in report["results"].items():
        assert set(tasks) == set(report["tasks"]) and report["tasks"], model
    for path in report["paths"]["llama"].values():
        assert Path(path).exists()
    assert (out / "hf_llama" / "model.safetensors").exists() and (out / "pretrain_llama" / "PRETRAIN_COMPLETE").exists()
    assert "| task | model | n (pos) | AUROC | AUPRC | Brier |" in first.stdout
    # interrupted or not, a re-run skips every finished stage and prints the same table
    before = (out / "eval_llama" / "metrics.json").stat().st_mtime_ns
    second = _ehrfm(*args, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (out / "eval_llama" / "metrics.json").stat().st_mtime_ns == before
    table = lambda text: text[text.index("| task |") : text.index("\nllama")]  # noqa: E731
    assert table(second.stdout) == table(first.stdout)


@pytest.mark.slow
def test_quick_ablation_end_to_end_and_resume(cohort, tmp_path):
    out = tmp_path / "ablation"
    args = [
        "ablate",
        "--quick",
        "--input",
        str(cohort),
        "--format",
        "fhir",
        "--task-sets",
        str(TASKS_YAML),
        "--out",
        str(out),
        "--backbones",
        "llama",
        "--steps",
        "2",
        "--epochs",
        "1",
        "--bootstrap",
        "10",
        "--jobs",
        "2",  # two pretraining runs at a time (mostly start-up on 2 cores); also the --jobs path
        *[f"--prepare-option={o}" for o in SMALL_SPLITS],
    ]
    first = _ehrfm(*args, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = (out / "results.jsonl").read_text().splitlines()
    from dataclasses import replace

    expected = cells(replace(quick_grid(2, 1), backbones=("llama",)))
    assert sorted(json.loads(x)["cell"] for x in lines) == sorted(c.name for c in expected)
    text = (out / "ablation.md").read_text()
    for axis in ("vocabulary", "context-size", "history", "concepts", "train-fraction"):
        assert f"## {axis}: AUPRC" in text and (out / f"ablation_{axis}_auprc.png").exists()
    # 4 data variants (base, b5, trunc-1y, DX) and 5 pretraining runs (+ C256); base cells share one experiment
    assert len(list((out / "data").iterdir())) == 4 and len(list((out / "runs").iterdir())) == 5
    assert len(list((out / "cells").iterdir())) == len({c.experiment_key for c in expected})
    second = _ehrfm(*args, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (out / "results.jsonl").read_text().splitlines() == lines  # nothing re-run

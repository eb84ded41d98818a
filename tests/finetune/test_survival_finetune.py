"""Time-to-event tasks through `ehrfm finetune` and `ehrfm evaluate`: a survival head per time-to-event task
beside the binary heads, survival curves that are proper (start below 1, never rise), and time-to-event
metrics with CIs and a calibration plot in the evaluation folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ehrfm.cli import main

TASKS_YAML = """
tasks:
  - name: any_visit_90d
    token: "[V90]"
    anchor: {kind: encounter_end, encounter_classes: [AMB], select: all}
    outcome: {kind: encounter_start, encounter_classes: [AMB, EMER, IMP, WELLNESS, VR], window_days: 90}
  - name: visit_tte
    token: "[VTE]"
    description: days to the next encounter of any class after an ambulatory one, followed for 90 days
    kind: time_to_event
    anchor: {kind: encounter_end, encounter_classes: [AMB], select: all}
    outcome: {kind: encounter_start, encounter_classes: [AMB, EMER, IMP, WELLNESS, VR], window_days: 90}
"""


@pytest.fixture(scope="module")
def tte_data(tmp_path_factory) -> Path:
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.prepare import prepare
    from ehrfm.data_shards.synthea import generate_cohort

    root = tmp_path_factory.mktemp("tte")
    (root / "tasks.yaml").write_text(TASKS_YAML)
    cfg = PrepareConfig(format="fhir", tasks=[str(root / "tasks.yaml")])
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test, cfg.splits.val_fraction, cfg.splits.seed = (
        0.2,
        0.5,
        0.3,
        0.4,
        1,
    )
    prepare(generate_cohort(6, seed=11, age="55-90", threads=1), root / "data", cfg, progress=False)
    return root / "data"


def test_survival_heads_finetune_and_evaluate(tte_data, export_factory, tmp_path):
    import polars as pl

    from ehrfm.finetune.model import load_finetuned
    from ehrfm.finetune.survival import SurvivalHead
    from ehrfm.finetune.train import predict

    labels = pl.read_parquet(tte_data / "labels" / "visit_tte" / "finetune.parquet")
    assert "time_to_event_days" in labels.columns and (labels["time_to_event_days"] > 0).all()
    hf = export_factory(tmp_path / "hf", tte_data, "llama")
    ft, ev = tmp_path / "ft", tmp_path / "eval"
    common = ["--method", "per-task", "--context-length", "24", "--epochs", "2", "progress_bar=false"]
    assert main(["finetune", "--model", str(hf), "--data", str(tte_data), "--out", str(ft), *common]) == 0
    meta = json.loads((ft / "finetune.json").read_text())
    edges = meta["survival_edges"]["visit_tte"]
    assert list(meta["survival_edges"]) == ["visit_tte"] and len(edges) == 9 and edges[0] == 0 and edges[-1] >= 80
    model, _ = load_finetuned(ft)
    kinds = [type(h).__name__ for h in model.heads]
    assert kinds == ["ClassificationHead", "SurvivalHead"] and isinstance(model.heads[1], SurvivalHead)

    from ehrfm.finetune.data import FinetuneDataset

    dataset = FinetuneDataset(tte_data, meta["tasks"], "test", 24)
    pred = predict(model, dataset)
    curves = pred["survival"][pred["task"] == 1]
    assert np.isnan(pred["survival"][pred["task"] == 0]).all() and len(curves)
    assert (curves <= 1).all() and (np.diff(curves, axis=1) <= 1e-6).all()  # survival never rises
    np.testing.assert_allclose(pred["probability"][pred["task"] == 1], 1 - curves[:, -1], rtol=1e-4, atol=1e-5)

    assert main(["evaluate", "--model", str(ft), "--data", str(tte_data), "--out", str(ev), "--bootstrap", "20"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())["tasks"]
    survival = metrics["visit_tte"]["time_to_event"]
    assert {"harrell_c", "uno_c", "ibs"} <= set(survival) and "time_to_event" not in metrics["any_visit_90d"]
    value = survival["harrell_c"]["value"]
    assert value is None or 0 <= value <= 1
    assert "## time-to-event" in (ev / "report.md").read_text()
    assert (ev / "visit_tte" / "survival_calibration.png").exists()


def test_time_to_event_tasks_need_per_task_heads(tte_data, export_factory, tmp_path, capsys):
    hf = export_factory(tmp_path / "hf", tte_data, "llama")
    argv = ["finetune", "--model", str(hf), "--data", str(tte_data), "--out", str(tmp_path / "ft"), "--method", "mpf"]
    assert main([*argv, "progress_bar=false"]) == 2
    assert "need --method per-task" in capsys.readouterr().err and not (tmp_path / "ft").exists()

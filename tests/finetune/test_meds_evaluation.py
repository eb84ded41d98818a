"""``ehrfm evaluate``'s predictions are scored by meds-evaluation too, and both agree where they measure the same
thing (every row weighted once)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from meds_evaluation.schema import PredictionSchema

from ehrfm.finetune.evaluate import write_evaluation


def test_meds_evaluation_agrees_with_ehrfm_metrics(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    subjects = rng.integers(0, 90, n)
    y = rng.random(n) < 0.3
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    frame = pl.DataFrame(
        {
            "subject_id": subjects.astype(np.int64),
            "prediction_time": [dt.datetime(2020, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 900, n)],
            "boolean_value": y,
            "predicted_boolean_probability": p.astype(np.float32).astype(np.float64),
            "task": ["t"] * n,
        }
    )
    metrics = write_evaluation(frame, tmp_path / "eval", model="m", split="test", n_boot=20, seed=0)
    ours = metrics["tasks"]["t"]
    theirs = ours["meds_evaluation"]["samples_equally_weighted"]
    assert theirs["roc_auc_score"] == pytest.approx(ours["auroc"]["value"], abs=1e-9)
    assert theirs["average_precision_score"] == pytest.approx(ours["auprc"]["value"], abs=1e-9)
    assert theirs["brier_score"] == pytest.approx(ours["brier"]["value"], abs=1e-6)
    # the per-subject weighting resamples rows: a different estimate of the same order
    assert 0.5 < ours["meds_evaluation"]["subjects_equally_weighted"]["roc_auc_score"] < 1.0
    PredictionSchema.validate(pq.read_table(tmp_path / "eval" / "t" / "predictions.parquet"))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["t"]["meds_evaluation"]
    assert saved["samples_equally_weighted"]["roc_auc_score"] == theirs["roc_auc_score"]
    assert "## meds-evaluation" in (tmp_path / "eval" / "report.md").read_text()

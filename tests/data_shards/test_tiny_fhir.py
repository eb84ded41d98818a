"""A hand-built FHIR bundle whose every token, attribute and label is known in advance."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
from transformers import AutoTokenizer

from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.examples import TaskExamples
from ehrfm.data_shards.prepare import prepare
from ehrfm.data_shards.schema import TokenType as T
from ehrfm.data_shards.stream import ShardReader

EXPECTED_TOKENS = [
    "[CLS]",
    "GENDER/FEMALE",
    "[VS]",
    "ENCOUNTER/IMP",
    "SNOMED/88805009",
    "LOINC/8867-4",
    "RXNORM/197361",
    "[S14D]",
    "[VE]",
    "[REG]",
    "[W2]",
    "[VS]",
    "ENCOUNTER/IMP",
    "SNOMED/430193006",
    "CVX/140",
    "[S2D]",
    "[VE]",
    "[REG]",
    "[W3]",
    "[VS]",
    "MEDS_DEATH",
    "[S1D]",
    "[VE]",
    "[REG]",
]
EXPECTED_TYPES = [
    T.CLS,
    T.OTHER,
    T.VS,
    T.OTHER,
    T.DX,
    T.VIT,
    T.MED,
    T.STAY,
    T.VE,
    T.REG,
    T.INTERVAL,
    T.VS,
    T.OTHER,
    T.PRO,
    T.IMM,
    T.STAY,
    T.VE,
    T.REG,
    T.INTERVAL,
    T.VS,
    T.OTHER,
    T.STAY,
    T.VE,
    T.REG,
]
EXPECTED_ORDERS = [0, 0] + [1] * 8 + [2] * 8 + [3] * 6
EXPECTED_SEGMENTS = [0, 0] + [1] * 8 + [2] * 8 + [1] * 6


def _prepare_all_pretrain(fhir_dir, out):
    cfg = PrepareConfig(format="fhir", tasks=["demo"])
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test, cfg.splits.val_fraction = 1.0, 0.0, 0.0, 0.0
    return prepare(fhir_dir, out, cfg, progress=False)


def test_tokens_and_streams_match_hand_derivation(tiny_fhir_dir, tmp_path):
    out = tmp_path / "prep"
    manifest = _prepare_all_pretrain(tiny_fhir_dir, out)
    assert manifest["counts"]["patients"] == {"pretrain": 1}
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    sample = ShardReader(out, manifest["shards"]["pretrain"]).get(0)
    assert tok.convert_ids_to_tokens(sample["input_ids"].tolist()) == EXPECTED_TOKENS
    assert sample["type_ids"].tolist() == [int(t) for t in EXPECTED_TYPES]
    assert sample["visit_orders"].tolist() == EXPECTED_ORDERS
    assert sample["visit_segments"].tolist() == EXPECTED_SEGMENTS
    # age at the first [VS]: 2001-01-01T08:00 minus birth 1950-01-01, in years of 365.25 days
    expected_age = (dt.datetime(2001, 1, 1, 8) - dt.datetime(1950, 1, 1)).total_seconds() / 86400 / 365.25
    assert abs(float(sample["ages"][2]) - expected_age) < 1e-4
    expected_weeks = dt.datetime(2001, 1, 1, 8, tzinfo=dt.UTC).timestamp() / (7 * 86400)
    assert abs(float(sample["times"][2]) - expected_weeks) < 1e-2
    # token times are non-decreasing within this (non-overlapping) timeline
    assert np.all(np.diff(sample["event_time_s"]) >= 0)


def test_labels_match_hand_derivation(tiny_fhir_dir, tmp_path):
    out = tmp_path / "prep"
    manifest = _prepare_all_pretrain(tiny_fhir_dir, out)
    los = pl.read_parquet(out / "labels/los_7d/pretrain.parquet")
    assert los["boolean_value"].to_list() == [True, False]  # 10-day stay, then 2-day stay
    assert los["prediction_time"].to_list() == [dt.datetime(2001, 1, 2, 8), dt.datetime(2001, 2, 1, 8)]
    rea = pl.read_parquet(out / "labels/readmission_30d/pretrain.parquet")
    # second discharge is censored: its 30-day window passes the data end (death on 2001-03-01)
    assert rea["boolean_value"].to_list() == [True]
    assert manifest["tasks"]["readmission_30d"]["excluded"] == {"censored": 1}
    mor = pl.read_parquet(out / "labels/mortality_1y/pretrain.parquet")
    assert mor["boolean_value"].to_list() == [True, True]


def test_task_example_is_cut_strictly_before_prediction_time(tiny_fhir_dir, tmp_path):
    out = tmp_path / "prep"
    _prepare_all_pretrain(tiny_fhir_dir, out)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    examples = TaskExamples(out, "los_7d", "pretrain")
    sample, label = examples[0]
    assert label is True
    # prediction 24 h after admission: the medication of day 10 and the stay's [VE]/[REG] are not visible
    assert tok.convert_ids_to_tokens(sample["input_ids"].tolist()) == EXPECTED_TOKENS[:6]
    cutoff = dt.datetime(2001, 1, 2, 8, tzinfo=dt.UTC).timestamp()
    assert sample["event_time_s"].max() < cutoff

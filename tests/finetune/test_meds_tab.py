"""The MEDS-Tab baseline's own parts (the tool itself runs from its environment: see the README's measured run):
MEDS-Tab's data layout by ehrfm split, and predictions made at prediction time - 1 us joined back to the labels."""

from __future__ import annotations

import datetime as dt

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

from ehrfm.finetune.data import FinetuneInputError
from ehrfm.finetune.meds_tab import _join_predictions, _write_meds_by_split

T = dt.datetime(2020, 1, 1)


def test_meds_layout_by_split_keeps_only_the_chosen_subjects(tmp_path):
    source = tmp_path / "src"
    (source / "data").mkdir(parents=True)
    events = pl.DataFrame(
        {
            "subject_id": [1, 1, 2, 3, 4],
            "time": [None, T, T, T, T],
            "code": ["GENDER/F", "A", "B", "C", "D"],
            "numeric_value": [None, 1.0, None, None, None],
            "encounter_id": ["x"] * 5,
        },
        schema_overrides={"time": pl.Datetime("us"), "numeric_value": pl.Float32},
    )
    events.write_parquet(source / "data" / "0.parquet")
    subjects = pl.DataFrame({"subject_id": [1, 2, 3], "meds_split": ["train", "tuning", "held_out"]})
    _write_meds_by_split(source, subjects, tmp_path / "out")
    train = pq.read_table(tmp_path / "out" / "data" / "train" / "0.parquet")
    meds.DataSchema.validate(train)
    assert train.column("code").to_pylist() == ["GENDER/F", "A"]  # static row first, extra columns dropped
    assert pl.read_parquet(tmp_path / "out" / "data" / "held_out" / "0.parquet")["subject_id"].to_list() == [3]
    assert not list((tmp_path / "out" / "data").glob("*/1.parquet"))


def test_predictions_at_the_shifted_time_join_back_to_the_labels():
    labels = pl.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "prediction_time": [T, T + dt.timedelta(days=3), T],
            "boolean_value": [True, False, True],
        },
        schema_overrides={"prediction_time": pl.Datetime("us")},
    )
    shifted = labels.with_columns(prediction_time=pl.col("prediction_time") - dt.timedelta(microseconds=1))
    predicted = shifted.with_columns(predicted_boolean_probability=pl.Series([0.9, 0.2, 0.7], dtype=pl.Float32))
    joined = _join_predictions(labels, predicted, "t")
    assert joined["predicted_boolean_probability"].to_list() == pytest.approx([0.9, 0.2, 0.7])
    assert joined["prediction_time"].to_list() == labels["prediction_time"].to_list()
    with pytest.raises(FinetuneInputError, match="no prediction for 1 label row"):
        _join_predictions(labels, predicted.head(2), "t")

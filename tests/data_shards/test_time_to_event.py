"""Time-to-event labels by hand: event times, censoring at the horizon, at the end of the record and at death
from another cause; binary labels of the same anchors are unchanged."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from ehrfm.config import ConfigError, from_dict
from ehrfm.data_shards.cleaning import Tally, clean_events
from ehrfm.data_shards.config import CleaningConfig, VocabConfig
from ehrfm.data_shards.tasks import TaskConfig, TaskTally, compute_labels
from ehrfm.data_shards.timeline import prepare_events

T0 = dt.datetime(2010, 1, 1)


def day(n: float) -> dt.datetime:
    return T0 + dt.timedelta(days=n)


def stay(sid: int, eid: str, start: float, end: float) -> list[tuple]:
    return [(sid, day(start), "ENCOUNTER/IMP", eid), (sid, day(end), "ENCOUNTER_END/IMP", eid)]


def events() -> pl.DataFrame:
    rows = []
    for sid in range(1, 6):
        rows.append((sid, day(-25000), "MEDS_BIRTH", None))
        rows += stay(sid, f"{sid}-a", 5, 10)
    rows.append((1, day(40), "MEDS_DEATH", None))  # dies 30 days after discharge
    rows.append((2, day(100), "LOINC/1", None))  # seen until day 100, alive
    rows.append((3, day(400), "MEDS_DEATH", None))  # dies after the 365-day horizon
    rows += stay(4, "4-b", 20, 22)  # readmitted 10 days after discharge
    rows.append((4, day(600), "LOINC/1", None))
    rows.append((5, day(15), "MEDS_DEATH", None))  # dies 5 days after discharge, never readmitted
    frame = pl.DataFrame(
        rows,
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "encounter_id": pl.String},
        orient="row",
    ).with_columns(
        numeric_value=pl.lit(None, pl.Float32), text_value=pl.lit(None, pl.String), event_type=pl.lit(None, pl.String)
    )
    return prepare_events(clean_events(frame, CleaningConfig(), Tally()), VocabConfig())


def task(kind: str, outcome: dict) -> TaskConfig:
    anchor = {"kind": "encounter_end", "encounter_classes": ["IMP"], "select": "first"}
    return from_dict(TaskConfig, {"name": "t", "kind": kind, "anchor": anchor, "outcome": outcome})


def labels(kind: str, outcome: dict) -> dict:
    frame = compute_labels(events(), task(kind, outcome), day(700), TaskTally())
    return {row["subject_id"]: row for row in frame.iter_rows(named=True)}


def test_death_time_to_event_with_horizon_and_end_of_record_censoring():
    got = labels("time_to_event", {"kind": "death", "window_days": 365})
    # patient 2 is seen until day 100 (censored 90 days after discharge), patient 4 until day 600 but followed
    # for the 365-day horizon only
    expected = {1: (True, 30.0), 2: (False, 90.0), 3: (False, 365.0), 4: (False, 365.0), 5: (True, 5.0)}
    assert {s: (r["boolean_value"], r["time_to_event_days"]) for s, r in got.items()} == expected


def test_readmission_time_to_event_censors_at_death():
    got = labels("time_to_event", {"kind": "encounter_start", "encounter_classes": ["IMP"], "window_days": 30})
    assert (got[4]["boolean_value"], got[4]["time_to_event_days"]) == (True, 10.0)
    assert (got[5]["boolean_value"], got[5]["time_to_event_days"]) == (False, 5.0)  # died first: censored
    assert (got[2]["boolean_value"], got[2]["time_to_event_days"]) == (False, 30.0)
    # binary labels of the same task: patient 5's window is not censored by the data end, so it is a negative
    binary = labels("binary", {"kind": "encounter_start", "encounter_classes": ["IMP"], "window_days": 30})
    assert binary[4]["boolean_value"] and not binary[5]["boolean_value"] and "time_to_event_days" not in binary[4]


def test_a_stay_length_cannot_be_a_time_to_event_task():
    with pytest.raises(ConfigError, match="time_to_event"):
        task("time_to_event", {"kind": "stay_longer_than", "stay_days": 7})

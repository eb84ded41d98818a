"""Property: a task example's input holds only events strictly before its prediction time."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehrfm.data_shards.cleaning import Tally, clean_events
from ehrfm.data_shards.config import CleaningConfig, HistoryConfig, VisitConfig, VocabConfig
from ehrfm.data_shards.examples import cut_at
from ehrfm.data_shards.tasks import TaskTally, compute_labels, load_tasks
from ehrfm.data_shards.timeline import build_sequences, prepare_events
from ehrfm.data_shards.vocab import Vocabulary

T0 = dt.datetime(2000, 1, 1)
CODES = ["SNOMED/1", "SNOMED/88805009", "LOINC/8867-4", "RXNORM/5", "CVX/1"]


@st.composite
def timelines(draw):
    rows = []
    for sid in range(draw(st.integers(1, 4))):
        birth = T0 - dt.timedelta(days=draw(st.integers(20 * 365, 80 * 365)))
        rows.append((sid, birth, "MEDS_BIRTH", None, None))
        rows.append((sid, None, "GENDER/F", None, None))
        t = 0.0
        for e in range(draw(st.integers(1, 5))):
            t += draw(st.floats(0.0, 400.0))
            los = draw(st.floats(0.0, 20.0))
            klass = draw(st.sampled_from(["IMP", "AMB", "EMER"]))
            start = T0 + dt.timedelta(days=t)
            eid = f"{sid}-{e}"
            rows.append((sid, start, f"ENCOUNTER/{klass}", None, eid))
            if draw(st.booleans()) or klass != "IMP":
                rows.append((sid, start + dt.timedelta(days=los), f"ENCOUNTER_END/{klass}", None, eid))
            for _ in range(draw(st.integers(0, 6))):
                offset = draw(st.floats(-1.0, los + 1.0))
                code = draw(st.sampled_from(CODES))
                value = draw(st.one_of(st.none(), st.floats(0, 200)))
                in_enc = draw(st.booleans())
                rows.append((sid, start + dt.timedelta(days=offset), code, value, eid if in_enc else None))
            t += los
        if draw(st.booleans()):
            rows.append((sid, T0 + dt.timedelta(days=t + draw(st.floats(0, 500))), "MEDS_DEATH", None, None))
    frame = pl.DataFrame(
        rows,
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
            "encounter_id": pl.String,
        },
        orient="row",
    ).with_columns(text_value=pl.lit(None, pl.String), event_type=pl.lit(None, pl.String))
    return frame


TASKS = load_tasks(["ehrmamba", "demo", "heart_failure"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines(), st.lists(st.floats(-100, 3000), min_size=1, max_size=5))
def test_inputs_precede_prediction_time(frame, extra_days):
    events = prepare_events(clean_events(frame, CleaningConfig(), Tally()), VocabConfig())
    counts = dict(events.group_by("code").len().iter_rows())
    vocab = Vocabulary.build(counts, {}, min_frequency=1, task_tokens=[])
    seqs = build_sequences(events, vocab, visit_cfg=VisitConfig(), history_cfg=HistoryConfig())
    samples = {
        row["subject_id"]: {k: np.asarray(v) for k, v in row.items() if k not in ("subject_id", "length", "birth_s")}
        for row in seqs.iter_rows(named=True)
    }
    data_end = events["time"].max()
    checks = 0
    for task in TASKS:
        labels = compute_labels(events, task, data_end, TaskTally())
        for sid, pred in labels.select("subject_id", "prediction_time").iter_rows():
            pred_s = int(pred.replace(tzinfo=dt.UTC).timestamp())
            cut = cut_at(samples[sid], pred_s)
            assert np.all(cut["event_time_s"] < pred_s)
            # nothing visible is dated after the prediction time in the raw events either
            raw = events.filter((pl.col("subject_id") == sid) & pl.col("time").is_not_null() & (pl.col("time") < pred))
            static = events.filter((pl.col("subject_id") == sid) & pl.col("time").is_null())
            # each visible event, at worst alone in its visit with the visit's five specials (interval, [VS],
            # stay length, [VE], [REG]), + [CLS] + the static codes
            assert len(cut["input_ids"]) <= len(raw) * 6 + 1 + len(static)
            checks += 1
    for sample in samples.values():
        for days in extra_days:
            pred_s = int((T0 + dt.timedelta(days=days)).replace(tzinfo=dt.UTC).timestamp())
            cut = cut_at(sample, pred_s, context_length=16)
            assert np.all(cut["event_time_s"] < pred_s) and len(cut["input_ids"]) <= 16
            # the cut keeps the most recent visible tokens
            visible = sample["event_time_s"][sample["event_time_s"] < pred_s]
            assert np.array_equal(cut["event_time_s"], visible[-16:])


def _samples(frame, lookback: str, split: str) -> dict:
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.passes import split_sequences

    events = prepare_events(clean_events(frame, CleaningConfig(), Tally()), VocabConfig())
    counts = dict(events.group_by("code").len().iter_rows())
    vocab = Vocabulary.build(counts, {}, min_frequency=1, task_tokens=[])
    cfg = PrepareConfig()
    cfg.history.lookback = lookback
    seqs = split_sequences(events.with_columns(split=pl.lit(split)), vocab, cfg)
    return {
        row["subject_id"]: {k: np.asarray(v) for k, v in row.items() if k not in ("subject_id", "length", "birth_s")}
        for row in seqs.iter_rows(named=True)
    }, vocab


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timelines(), st.sampled_from(["1y", "3y", "latest_visit"]), st.lists(st.floats(1, 3000), min_size=1, max_size=4))
def test_history_truncation_is_relative_to_the_prediction_time(frame, lookback, days):
    """003 truncation must not look at the end of the record: a visit far in the future (or its absence)
    cannot change what an earlier example sees. Truncating by the last visit (the old bug) fails this."""
    future = (
        frame.select("subject_id")
        .unique()
        .with_columns(
            time=pl.lit(T0 + dt.timedelta(days=20000)).cast(pl.Datetime("us")),
            code=pl.lit("ENCOUNTER/AMB"),
            numeric_value=pl.lit(None, pl.Float32),
            encounter_id=pl.lit("future"),
            text_value=pl.lit(None, pl.String),
            event_type=pl.lit(None, pl.String),
        )
        .select(frame.columns)
    )
    extended = pl.concat([frame, future, future.with_columns(code=pl.lit("SNOMED/1"))])
    plain, vocab = _samples(frame, lookback, "test")
    longer, vocab_b = _samples(extended, lookback, "test")
    for sid, sample in plain.items():
        for d in days:
            pred_s = int((T0 + dt.timedelta(days=d)).replace(tzinfo=dt.UTC).timestamp())
            a = cut_at(sample, pred_s, lookback=lookback)
            b = cut_at(longer[sid], pred_s, lookback=lookback)
            assert np.all(a["event_time_s"] < pred_s)
            assert np.array_equal(a["event_time_s"], b["event_time_s"])
            assert [vocab.tokens[i] for i in a["input_ids"]] == [vocab_b.tokens[i] for i in b["input_ids"]]
            orders = a["visit_orders"][a["visit_orders"] > 0]
            if len(orders):  # renumbered from 1 like pretraining sequences, segments alternate with them
                assert orders.min() == 1 and np.array_equal(a["visit_segments"][a["visit_orders"] > 0], 2 - orders % 2)
            if lookback == "latest_visit":
                assert len(set(orders.tolist())) <= 1

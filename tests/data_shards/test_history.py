"""003 history options: look-back truncation, aggregation of repeated numeric events, concept groups,
plus external labels flowing through prepare."""

from __future__ import annotations

import datetime as dt

import polars as pl

from ehrfm.data_shards.cleaning import Tally, clean_events
from ehrfm.data_shards.config import CleaningConfig, HistoryConfig, PrepareConfig, VisitConfig, VocabConfig
from ehrfm.data_shards.prepare import prepare
from ehrfm.data_shards.timeline import build_sequences, prepare_events
from ehrfm.data_shards.vocab import Vocabulary

D = dt.datetime


def _events(rows) -> pl.DataFrame:
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
    )
    frame = frame.with_columns(text_value=pl.lit(None, pl.String), event_type=pl.lit(None, pl.String))
    return prepare_events(clean_events(frame, CleaningConfig(), Tally()), VocabConfig())


ROWS = [
    (1, D(1950, 1, 1), "MEDS_BIRTH", None, None),
    (1, D(2000, 1, 1, 8), "ICD10CM/I10", None, "a"),  # visit a, 2000
    (1, D(2003, 6, 1, 8), "ICD10CM/E11", None, "b"),  # visit b, 2003
    (1, D(2003, 6, 1, 9), "LOINC/2345-7", 100.0, "b"),
    (1, D(2003, 6, 1, 20), "LOINC/2345-7", 200.0, "b"),  # same day: aggregated with the one above
    (1, D(2003, 6, 3, 9), "LOINC/2345-7", 50.0, "b"),  # day 2: its own window
    (1, D(2004, 1, 1, 8), "RXNORM/1", None, "c"),  # visit c, 7 months later
]


def _tokens(events, history: HistoryConfig, edges=None) -> list[str]:
    counts = dict(events.group_by("code").len().iter_rows())
    vocab = Vocabulary.build(counts, edges or {}, min_frequency=1, task_tokens=[])
    if edges:
        vocab = Vocabulary(vocab.tokens + [f"LOINC/2345-7//Q{k}" for k in (1, 2, 3)], [], edges, {})
    seqs = build_sequences(events, vocab, visit_cfg=VisitConfig(), history_cfg=history)
    return [vocab.tokens[i] for i in seqs["input_ids"][0].to_list()]


def test_lookback_windows():
    events = _events(ROWS)
    everything = _tokens(events, HistoryConfig())
    assert everything.count("[VS]") == 3 and "ICD10CM/I10" in everything
    one_year = _tokens(events, HistoryConfig(lookback="1y"))
    assert one_year.count("[VS]") == 2 and "ICD10CM/I10" not in one_year and "ICD10CM/E11" in one_year
    latest = _tokens(events, HistoryConfig(lookback="latest_visit"))
    assert latest == ["[CLS]", "[VS]", "RXNORM/1", "[S1D]", "[VE]", "[REG]"]


def test_aggregation_averages_repeated_values_within_the_window():
    events = _events(ROWS)
    edges = {"LOINC/2345-7": [75.0, 125.0]}
    raw = _tokens(events, HistoryConfig(), edges)
    assert [t for t in raw if t.startswith("LOINC")] == ["LOINC/2345-7//Q2", "LOINC/2345-7//Q3", "LOINC/2345-7//Q1"]
    daily = _tokens(events, HistoryConfig(aggregate_days=1), edges)
    # 100 and 200 on day 1 average to 150 (bin 3); day 3's 50 stays alone (bin 1)
    assert [t for t in daily if t.startswith("LOINC")] == ["LOINC/2345-7//Q3", "LOINC/2345-7//Q1"]


def test_concept_groups_filter_event_types():
    events = _events(ROWS)
    dx_only = _tokens(events, HistoryConfig(concept_groups=["DX"]))
    assert [t for t in dx_only if not t.startswith("[")] == ["ICD10CM/I10", "ICD10CM/E11"]


def test_external_labels_are_split_like_their_subjects(tmp_path):
    root = tmp_path / "meds"
    (root / "data").mkdir(parents=True)
    rows = [(sid, D(2000, 1, 1 + sid % 20), "ICD10CM/I10", None, None) for sid in range(40)]
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
    )
    frame.drop("encounter_id").write_parquet(root / "data" / "0.parquet")
    labels = pl.DataFrame(
        {
            "subject_id": list(range(40)),
            "prediction_time": [D(2001, 1, 1)] * 40,
            "boolean_value": [s % 3 == 0 for s in range(40)],
        }
    )
    labels.write_parquet(tmp_path / "aces_task.parquet")
    cfg = PrepareConfig(tasks=[], external_labels=[str(tmp_path / "aces_task.parquet")])
    manifest = prepare(root, tmp_path / "out", cfg, progress=False)
    files = manifest["tasks"]["aces_task"]["files"]
    assert sum(f["rows"] for f in files.values()) == 40
    assert sum(f["positives"] for f in files.values()) == 14
    for split, info in files.items():
        got = pl.read_parquet(tmp_path / "out" / info["path"])
        shard_ids = set()
        for shard in manifest["shards"][split]:
            import pyarrow as pa

            shard_ids |= set(
                pa.ipc.open_file(pa.memory_map(str(tmp_path / "out" / shard["path"])))
                .read_all()
                .column("subject_id")
                .to_pylist()
            )
        assert set(got["subject_id"].to_list()) <= shard_ids


STAY_ROWS = [
    (1, D(1950, 1, 1), "MEDS_BIRTH", None, None),
    (1, D(2000, 1, 1, 8), "ICD10CM/I10", None, "a"),  # a: a single instant -> [S1D]
    (1, D(2000, 3, 1, 8), "ICD10CM/I10", None, "b"),
    (1, D(2000, 3, 8, 8), "RXNORM/1", None, "b"),  # b: exactly 7 days -> [S7D] (7 days is not "longer than 7")
    (1, D(2000, 6, 1, 8), "ICD10CM/I10", None, "c"),
    (1, D(2000, 6, 8, 8, 0, 1), "RXNORM/1", None, "c"),  # c: 7 days + 1 s -> [S14D]
    (1, D(2000, 9, 1, 8), "ICD10CM/I10", None, "d"),
    (1, D(2000, 10, 2, 8), "RXNORM/1", None, "d"),  # d: 31 days -> [SLT]
    (1, D(2001, 1, 1, 8), "ICD10CM/I10", None, "e"),
    (1, D(2001, 1, 2, 20), "RXNORM/1", None, "e"),  # e: 1.5 days -> [S2D]
]


def test_stay_tokens_by_hand():
    """Each visit ends ``<stay token> [VE] [REG]``, the token from the visit's end minus start (hand-derived
    above); ``visits.stay_tokens: false`` gives the CEHR-BERT layout without them."""
    events = _events(STAY_ROWS)
    tokens = _tokens(events, HistoryConfig())
    stays = [tokens[i - 1] for i, t in enumerate(tokens) if t == "[VE]"]
    assert stays == ["[S1D]", "[S7D]", "[S14D]", "[SLT]", "[S2D]"]
    counts = dict(events.group_by("code").len().iter_rows())
    vocab = Vocabulary.build(counts, {}, min_frequency=1, task_tokens=[])
    plain = build_sequences(events, vocab, visit_cfg=VisitConfig(stay_tokens=False), history_cfg=HistoryConfig())
    plain_tokens = [vocab.tokens[i] for i in plain["input_ids"][0].to_list()]
    assert plain_tokens == [t for t in tokens if not (t.startswith("[S") and t.endswith("D]")) and t != "[SLT]"]
    assert not any(t.startswith("[S") for t in plain_tokens)

"""history.lookback=inpatient_24h: pretraining documents of the first 24 h of each inpatient stay, checked
token by token against a hand-made timeline; task examples keep their whole history."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from ehrfm.config import ConfigError, load_config
from ehrfm.data_shards.cleaning import Tally, clean_events
from ehrfm.data_shards.config import LOOKBACKS, CleaningConfig, HistoryConfig, PrepareConfig, VocabConfig
from ehrfm.data_shards.examples import cut_at
from ehrfm.data_shards.passes import split_sequences
from ehrfm.data_shards.timeline import STAY_WINDOWS, prepare_events
from ehrfm.data_shards.vocab import Vocabulary

D = dt.datetime
SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "encounter_id": pl.String,
}
ROWS = [
    (1, D(1950, 1, 1), "MEDS_BIRTH", None, None),
    (1, None, "GENDER/F", None, None),  # static: kept
    (1, D(2000, 1, 1, 8), "ENCOUNTER/AMB", None, "a"),  # a: ambulatory, dropped
    (1, D(2000, 1, 1, 8), "ICD10CM/I10", None, "a"),
    (1, D(2000, 3, 1, 8), "ENCOUNTER/IMP", None, "b"),  # b: inpatient from 03-01 08:00
    (1, D(2000, 3, 1, 10), "LOINC/2345-7", None, "b"),
    (1, D(2000, 3, 2, 7, 59), "RXNORM/1", None, "b"),  # 23 h 59 min in: kept
    (1, D(2000, 3, 2, 8), "RXNORM/2", None, "b"),  # exactly 24 h in: dropped
    (1, D(2000, 3, 3, 8), "ICD10CM/E11", None, "b"),  # day 3: dropped
    (1, D(2000, 3, 10, 8), "ENCOUNTER_END/IMP", None, "b"),  # true end dropped: b ends at 03-02 07:59
    (1, D(2000, 3, 17, 8), "ENCOUNTER/IMP", None, "c"),  # 15 days after b's cut end ([W2]; 7 after its true end)
    (1, D(2000, 3, 17, 12), "SNOMED/1", None, "c"),
    (1, D(2000, 3, 17, 20), "ENCOUNTER_END/IMP", None, "c"),  # discharged within the window: c ends here
    (1, D(2000, 4, 1, 8), "ENCOUNTER/EMER", None, "d"),  # d: emergency, dropped
    (1, D(2000, 4, 1, 9), "ICD10CM/I10", None, "d"),
    (2, D(1960, 1, 1), "MEDS_BIRTH", None, None),  # 2: no inpatient stay
    (2, D(2000, 1, 1, 8), "ENCOUNTER/AMB", None, "e"),
    (2, D(2000, 1, 1, 8), "ICD10CM/I10", None, "e"),
]
EXPECTED = [
    "[CLS]",
    "GENDER/F",
    "[VS]",
    "ENCOUNTER/IMP",
    "LOINC/2345-7",
    "RXNORM/1",
    "[S1D]",
    "[VE]",
    "[REG]",
    "[W2]",
    "[VS]",
    "ENCOUNTER/IMP",
    "SNOMED/1",
    "[S1D]",
    "[VE]",
    "[REG]",
]


def _epoch_s(t: dt.datetime) -> int:
    return int(t.replace(tzinfo=dt.UTC).timestamp())


def _samples(lookback: str, split: str) -> tuple[dict, Vocabulary]:
    frame = pl.DataFrame(ROWS, schema=SCHEMA, orient="row").with_columns(
        text_value=pl.lit(None, pl.String), event_type=pl.lit(None, pl.String)
    )
    events = prepare_events(clean_events(frame, CleaningConfig(), Tally()), VocabConfig())
    vocab = Vocabulary.build(dict(events.group_by("code").len().iter_rows()), {}, min_frequency=1, task_tokens=[])
    cfg = PrepareConfig(history=HistoryConfig(lookback=lookback))
    seqs = split_sequences(events.with_columns(split=pl.lit(split)), vocab, cfg)
    samples = {
        row["subject_id"]: {k: np.asarray(v) for k, v in row.items() if k not in ("subject_id", "length", "birth_s")}
        for row in seqs.iter_rows(named=True)
    }
    return samples, vocab


def test_pretraining_documents_keep_the_first_24_hours_of_inpatient_stays():
    samples, vocab = _samples("inpatient_24h", "pretrain")
    assert set(samples) == {1}  # patient 2 never stayed in hospital: no document
    doc = samples[1]
    assert [vocab.tokens[i] for i in doc["input_ids"]] == EXPECTED
    assert doc["visit_orders"].tolist() == [0, 0] + [1] * 7 + [2] * 7
    assert doc["visit_segments"].tolist() == [0, 0] + [1] * 7 + [2] * 7
    ve_times = doc["event_time_s"][[i for i, t in enumerate(EXPECTED) if t == "[VE]"]]
    assert ve_times.tolist() == [_epoch_s(D(2000, 3, 2, 7, 59)), _epoch_s(D(2000, 3, 17, 20))]


def test_task_examples_keep_their_whole_history():
    samples, vocab = _samples("inpatient_24h", "finetune")
    full, _ = _samples("all", "finetune")
    assert set(samples) == {1, 2}
    tokens = [vocab.tokens[i] for i in samples[1]["input_ids"]]
    assert tokens.count("[VS]") == 4 and "RXNORM/2" in tokens and "ENCOUNTER/AMB" in tokens
    pred = _epoch_s(D(2000, 3, 5))
    cut, plain = cut_at(samples[1], pred, lookback="inpatient_24h"), cut_at(full[1], pred, lookback="all")
    assert all(np.array_equal(cut[k], plain[k]) for k in cut if isinstance(cut[k], np.ndarray))
    assert "ICD10CM/E11" in [vocab.tokens[i] for i in cut["input_ids"]]


def test_lookback_names_come_from_the_config():
    assert "inpatient_24h" in LOOKBACKS and LOOKBACKS[0] == "all"
    assert set(STAY_WINDOWS) <= set(LOOKBACKS)  # every stay window is a config value
    cfg = load_config(PrepareConfig, None, ["history.lookback=inpatient_24h"])
    assert cfg.history.lookback == "inpatient_24h"
    with pytest.raises(ConfigError, match="inpatient_24h"):
        load_config(PrepareConfig, None, ["history.lookback=first_24h"])


def test_slot_bound_is_the_ratio_of_real_token_fractions():
    from ehrfm.pretrain.bench import slot_bound

    # 10% of packed slots and 70% of padded slots are padding: 0.9 / 0.3 real tokens per slot
    assert slot_bound(0.1, 0.7) == pytest.approx(3.0)


def test_train_throughput_bench_on_a_short_history_folder(tmp_path, capsys):
    """`ehrfm bench train-throughput --data` on the timeline above prepared with inpatient_24h: one 16-token
    sequence, cut at --context 8 into 2 documents of 8; the bound is printed next to the measured ratio."""
    from ehrfm.data_shards.prepare import prepare
    from ehrfm.pretrain.bench import _parse, run

    (tmp_path / "meds" / "data").mkdir(parents=True)
    pl.DataFrame(ROWS, schema=SCHEMA, orient="row").write_parquet(tmp_path / "meds" / "data" / "0.parquet")
    cfg = load_config(PrepareConfig, None, ["history.lookback=inpatient_24h", "tasks=[]"])
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test, cfg.splits.val_fraction = 1.0, 0.0, 0.0, 0.0
    cfg.splits.respect_meds_splits = False
    prepare(tmp_path / "meds", tmp_path / "data", cfg, progress=False)
    argv = ["--data", str(tmp_path / "data"), "--model", "llama", "--size", "mini", "--context", "8"]
    out = run([*argv, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--loader-batches", "1"])
    assert out["history_lookback"] == "inpatient_24h"
    assert out["documents"] == {"sequences": 1, "documents": 2, "mean_document_length": 8.0}
    assert out["packed"]["pad_fraction"] == out["padded_hf_style"]["pad_fraction"] == 0.0
    assert out["packed"]["stream_pad_fraction"] == out["padded_hf_style"]["stream_pad_fraction"] == 0.0
    assert out["packed_over_padded_slot_bound"] == out["packed_over_padded_stream_slot_bound"] == 1.0
    assert "x measured, 1.00x slot bound" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse([*argv, "--history-lookback", "1y"])  # a prepared folder keeps its own lookback

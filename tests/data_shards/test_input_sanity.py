"""Input sanity of `ehrfm prepare` (issue 12): reserved codes, non-finite values, implausible times, config
value ranges, task names and FHIR value/split-patient problems are each counted or refused with a clear error."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from ehrfm.config import ConfigError, load_config
from ehrfm.data_shards.config import CleaningConfig, PrepareConfig
from ehrfm.data_shards.errors import DataError
from ehrfm.data_shards.prepare import derive_data_end, prepare
from ehrfm.data_shards.schema import PAD_ID, SPECIAL_TOKENS, SPECIAL_TYPES, TokenType
from ehrfm.data_shards.tasks import load_tasks

from .conftest import write_bundle


def _meds(root: Path, frame: pl.DataFrame) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    frame.write_parquet(root / "data" / "0.parquet")
    return root


def _frame(rows: list[tuple]) -> pl.DataFrame:
    """rows of (subject_id, time, code, numeric_value)."""
    return pl.DataFrame(
        rows,
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float64},
        orient="row",
    )


def _all_pretrain(**kw) -> PrepareConfig:
    cfg = PrepareConfig(**kw)
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test, cfg.splits.val_fraction = 1.0, 0.0, 0.0, 0.0
    return cfg


def _sequences(out: Path, manifest: dict) -> list[dict]:
    rows = []
    for shards in manifest["shards"].values():
        for shard in shards:
            rows += pa.ipc.open_file(pa.memory_map(str(out / shard["path"]))).read_all().to_pylist()
    return rows


D = dt.datetime


# 1. codes spelled like special or task tokens -------------------------------------------------------------


def test_reserved_codes_are_escaped_counted_and_never_special_ids(tmp_path):
    rows = [
        (1, D(1960, 1, 1), "MEDS_BIRTH", None),
        (1, None, "[CLS]", None),
        (1, D(2000, 1, 1), "[PAD]", None),
        (1, D(2000, 1, 1), "[MOR]", None),
        (1, D(2000, 1, 2), "[VS]", 4.0),
        (1, D(2000, 1, 2), "CODE//[PAD]", None),
        (1, D(2000, 3, 1), "SNOMED/1", None),
        (2, D(1970, 1, 1), "MEDS_BIRTH", None),
        (2, D(2001, 1, 1), "[REG]", None),
        (2, D(2001, 1, 1), "[LT]", None),
    ]
    root = _meds(tmp_path / "in", _frame(rows))
    manifest = prepare(root, tmp_path / "out", _all_pretrain(tasks=["ehrmamba"]), progress=False)
    assert manifest["cleaning"]["notes"]["escaped_reserved_codes"] == 7
    vocab = json.loads((tmp_path / "out" / "tokenizer" / "ehrfm_vocab.json").read_text())
    assert "[MOR]" in vocab["task_tokens"]
    for code in ("CODE//[PAD]", "CODE//[MOR]", "CODE//[CLS]", "CODE//[REG]", "CODE//[LT]", "CODE//CODE//[PAD]"):
        assert code in vocab["tokens"], code
    reserved = {vocab["tokens"].index(t) for t in (*SPECIAL_TOKENS, *vocab["task_tokens"])}
    unk = vocab["tokens"].index("[UNK]")
    seqs = _sequences(tmp_path / "out", manifest)
    assert len(seqs) == 2
    for seq in seqs:
        ids, types = seq["input_ids"], seq["type_ids"]
        assert ids[0] == vocab["tokens"].index("[CLS]") and ids.count(ids[0]) == 1
        assert PAD_ID not in ids and unk not in ids
        for token_id, type_id in zip(ids, types):
            if token_id in reserved:  # only the layout's own structure tokens
                assert TokenType(type_id) in SPECIAL_TYPES and TokenType(type_id) != TokenType.TASK


# 2. NaN / inf / beyond-float32 numeric values ------------------------------------------------------------


def test_non_finite_numeric_values_become_missing_and_are_counted(tmp_path):
    values = [float("nan"), float("inf"), -float("inf"), 1e300, 1.0, 2.0, 3.0, 4.0]
    rows = [(1, D(1960, 1, 1), "MEDS_BIRTH", None)] + [(1, D(2000, 1, 1 + i), "LAB/x", v) for i, v in enumerate(values)]
    root = _meds(tmp_path / "in", _frame(rows))
    cfg = _all_pretrain(tasks=[])
    cfg.vocab.num_bins = 2
    manifest = prepare(root, tmp_path / "out", cfg, progress=False)
    cleaning = manifest["cleaning"]
    assert cleaning["notes"]["non_finite_numeric_values"] == 4
    assert cleaning["dropped_rows"] == {} and cleaning["rows_out"] == len(rows)  # events stay, values go
    vocab = json.loads((tmp_path / "out" / "tokenizer" / "ehrfm_vocab.json").read_text())
    assert vocab["bin_edges"]["LAB/x"] == [2.5]
    # the four events without a value are plain code tokens, the others binned
    seq = _sequences(tmp_path / "out", manifest)[0]
    tokens = [vocab["tokens"][i] for i in seq["input_ids"]]
    assert tokens.count("LAB/x") == 4 and tokens.count("LAB/x//Q1") == 2 and tokens.count("LAB/x//Q2") == 2


# 3. implausible event times and the data end -------------------------------------------------------------


def test_out_of_bounds_times_are_dropped_and_do_not_move_data_end(tmp_path):
    rows = [
        (1, D(1960, 1, 1), "MEDS_BIRTH", None),
        (1, D(2000, 1, 1), "SNOMED/1", None),
        (1, D(9999, 12, 31), "SNOMED/2", None),
        (1, D(1850, 1, 1), "SNOMED/3", None),
        (2, D(1970, 1, 1), "MEDS_BIRTH", None),
        (2, D(2001, 6, 1), "SNOMED/1", None),
        (3, D(1940, 1, 1), "MEDS_BIRTH", None),
        (3, D(2001, 5, 1), "SNOMED/4", None),
    ]
    frame = _frame(rows).vstack(
        pl.DataFrame(
            {"subject_id": [3], "time": [None], "code": ["GENDER/F"], "numeric_value": [None]}, schema=_frame([]).schema
        )
    )
    root = _meds(tmp_path / "in", frame)
    manifest = prepare(root, tmp_path / "out", _all_pretrain(tasks=[]), progress=False)
    assert manifest["cleaning"]["dropped_rows"] == {"time_out_of_bounds": 2}
    assert manifest["data_end"] == "2001-06-01 00:00:00"
    assert manifest["data_end_rule"]["source"] == "derived"
    assert manifest["counts"]["patients_total"] == 3  # the static row with a null time stayed
    assert "events_after_data_end" not in manifest["cleaning"]["notes"]


def test_in_bounds_outlier_does_not_move_data_end_and_mimic_dates_are_kept(tmp_path):
    # MIMIC-IV-style shifted dates (2150s) are plausible; one subject ending 40 years later is an outlier.
    rows = []
    for sid, last in ((1, D(2150, 3, 1)), (2, D(2150, 6, 1)), (3, D(2150, 9, 1)), (4, D(2190, 1, 1))):
        rows += [
            (sid, D(2100, 1, 1), "MEDS_BIRTH", None),
            (sid, D(2150, 1, 1), "SNOMED/1", None),
            (sid, last, "SNOMED/2", None),
        ]
    root = _meds(tmp_path / "in", _frame(rows))
    manifest = prepare(root, tmp_path / "a", _all_pretrain(tasks=[]), progress=False)
    assert manifest["cleaning"]["dropped_rows"] == {}
    assert manifest["data_end"] == "2150-09-01 00:00:00"
    assert manifest["cleaning"]["notes"]["events_after_data_end"] == 1
    assert manifest["data_end_rule"]["subjects_ending_after_data_end"] == 1
    cfg = _all_pretrain(tasks=[])
    cfg.cleaning.data_end = "2150-07-01"
    manifest = prepare(root, tmp_path / "b", cfg, progress=False)
    assert manifest["data_end"] == "2150-07-01 00:00:00" and manifest["data_end_rule"]["source"].startswith("config")
    assert manifest["cleaning"]["notes"]["events_after_data_end"] == 2


def test_derive_data_end_rule():
    day = 86400 * 1_000_000
    end = lambda times, **kw: derive_data_end(np.array(times) * day, CleaningConfig(**kw))[0]  # noqa: E731
    epoch = D(1970, 1, 1)
    assert end([100]) == epoch + dt.timedelta(days=100)  # one subject: its last time
    assert end([100, 200, 300]) == epoch + dt.timedelta(days=300)  # all within the margin: the max
    assert end([100, 200, 300, 300 + 366]) == epoch + dt.timedelta(days=300)  # a far outlier is ignored
    assert end([100, 200, 300, 300 + 366], data_end_margin_days=400) == epoch + dt.timedelta(days=666)
    many = list(range(1000)) + [50_000] * 5  # < 1 % far outliers
    assert end(many) == epoch + dt.timedelta(days=999)


# 4. config value ranges and task names -------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,key,shown",
    [
        ("vocab.num_bins=-3", "vocab.num_bins", "-3"),
        ("vocab.icd_level=0", "vocab.icd_level", "0"),
        ("vocab.min_frequency=0", "vocab.min_frequency", "0"),
        ("vocab.max_values_per_code=0", "vocab.max_values_per_code", "0"),
        ("vocab.extra_task_tokens=['[PAD]']", "vocab.extra_task_tokens", "[PAD]"),
        ("splits.pretrain=1.5", "splits.pretrain", "1.5"),
        ("splits.test=0.5", "splits.pretrain", "0.5"),  # the fractions must sum to 1
        ("splits.val_fraction=1", "splits.val_fraction", "1.0"),
        ("visits.gap_hours=0", "visits.gap_hours", "0.0"),
        ("history.aggregate_days=-1", "history.aggregate_days", "-1.0"),
        ("history.concept_groups=", "history.concept_groups", "[]"),
        ("history.concept_groups=DX,FOO", "history.concept_groups", "FOO"),
        ("cleaning.after_death_tolerance_hours=-1", "cleaning.after_death_tolerance_hours", "-1.0"),
        ("cleaning.min_events_per_patient=0", "cleaning.min_events_per_patient", "0"),
        ("cleaning.min_time=2400-01-01", "cleaning.min_time", "2400-01-01"),
        ("cleaning.max_time=someday", "cleaning.max_time", "someday"),
        ("cleaning.data_end=soon", "cleaning.data_end", "soon"),
        ("cleaning.data_end_margin_days=-1", "cleaning.data_end_margin_days", "-1.0"),
        ("shards.patients_per_shard=0", "shards.patients_per_shard", "0"),
        ("shards.fhir_bundles_per_shard=0", "shards.fhir_bundles_per_shard", "0"),
        ("shards.max_rows_per_batch=0", "shards.max_rows_per_batch", "0"),
        ("external_labels=../labels/bad name.parquet", "external_labels[0]", "bad name"),
    ],
)
def test_config_value_ranges_name_the_key(override, key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, None, [override])
    message = str(err.value)
    assert message.startswith(key) and shown in message, message


def test_config_value_ranges_accept_valid_values():
    cfg = load_config(
        PrepareConfig,
        None,
        [
            "vocab.num_bins=1",
            "cleaning.data_end=2150-01-01",
            "splits.pretrain=0.6",
            "splits.finetune=0.25",
            "history.aggregate_days=0",
            "vocab.icd_level=3",
        ],
    )
    assert cfg.vocab.num_bins == 1 and cfg.cleaning.data_end == "2150-01-01"
    with pytest.raises(ConfigError, match=r"vocab\.num_bins.*-3"):
        load_config(PrepareConfig, None, ["vocab.num_bins=-3"])


def test_task_name_that_escapes_the_labels_folder_is_refused(tmp_path):
    root = _meds(
        tmp_path / "in", _frame([(1, D(1960, 1, 1), "MEDS_BIRTH", None), (1, D(2000, 1, 1), "SNOMED/1", None)])
    )
    task_file = tmp_path / "evil.yaml"
    task_file.write_text("tasks:\n  - name: ../../X\n    token: '[X]'\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml.*name.*\.\./\.\./X"):
        load_tasks([str(task_file)])
    with pytest.raises(ConfigError, match=r"evil\.yaml.*\.\./\.\./X"):
        prepare(root, tmp_path / "work" / "out", PrepareConfig(tasks=[str(task_file)]), progress=False)
    assert not (tmp_path / "work").exists() and not (tmp_path / "X").exists()
    task_file.write_text("tasks:\n  - name: ok\n    token: '[PAD]'\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml.*token"):
        load_tasks([str(task_file)])


def test_external_label_file_name_is_checked_before_work(tmp_path):
    root = _meds(
        tmp_path / "in", _frame([(1, D(1960, 1, 1), "MEDS_BIRTH", None), (1, D(2000, 1, 1), "SNOMED/1", None)])
    )
    labels = pl.DataFrame({"subject_id": [1], "prediction_time": [D(2000, 1, 2)], "boolean_value": [True]})
    (tmp_path / "lab").mkdir()
    for name in ("bad name.parquet", "los_7d.parquet"):
        labels.write_parquet(tmp_path / "lab" / name)
        cfg = PrepareConfig(tasks=["demo"], external_labels=[str(tmp_path / "lab" / name)])
        with pytest.raises(ConfigError, match=r"external_labels\[0\]"):
            prepare(root, tmp_path / "out", cfg, progress=False)
        assert not (tmp_path / "out").exists()


# 5. FHIR values and patients split over bundle files ----------------------------------------------------


def test_fhir_non_numeric_values_are_counted_with_resource_ids(tmp_path, bundle_factory):
    bundle = bundle_factory()
    obs = bundle["entry"][3]["resource"]
    assert obs["id"] == "o1"
    obs["valueQuantity"]["value"] = "12.5"
    extra = json.loads(json.dumps(bundle["entry"][3]))
    extra["resource"].update(id="o2", valueQuantity={"value": "abc"})
    panel = json.loads(json.dumps(bundle["entry"][3]))
    del panel["resource"]["valueQuantity"]
    panel["resource"].update(
        id="o3",
        component=[
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": True}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, "valueInteger": "7"},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]}, "valueQuantity": {"value": 37.0}},
        ],
    )
    bundle["entry"] += [extra, panel]
    write_bundle(tmp_path / "fhir", bundle)
    manifest = prepare(tmp_path / "fhir", tmp_path / "out", _all_pretrain(format="fhir", tasks=[]), progress=False)
    fhir = manifest["fhir"]
    assert fhir["invalid_values"] == {"valueQuantity.value_not_a_number": 3, "valueInteger_not_a_number": 1}
    assert [e["resource"] for e in fhir["invalid_value_examples"]] == [
        "Observation/o1",
        "Observation/o2",
        "Observation/o3",
        "Observation/o3",
    ]
    assert all(e["file"].endswith("p1.json") for e in fhir["invalid_value_examples"])
    vocab = json.loads((tmp_path / "out" / "tokenizer" / "ehrfm_vocab.json").read_text())
    for code in ("LOINC/8867-4", "LOINC/8480-6", "LOINC/8462-4", "LOINC/8310-5"):  # the events stay, without values
        assert code in vocab["tokens"]


@pytest.mark.parametrize("per_shard", [1, 100])
def test_fhir_patient_split_over_two_bundles_names_files_and_patient(tmp_path, bundle_factory, per_shard):
    bundle = bundle_factory()
    first, second = dict(bundle, entry=bundle["entry"][:3]), dict(bundle, entry=bundle["entry"][3:])
    a = write_bundle(tmp_path / "fhir", first, "a.json")
    b = write_bundle(tmp_path / "fhir", second, "b.json")
    cfg = PrepareConfig(format="fhir", tasks=[])
    cfg.shards.fhir_bundles_per_shard = per_shard
    with pytest.raises(DataError) as err:
        prepare(tmp_path / "fhir", tmp_path / "out", cfg, progress=False)
    message = str(err.value)
    assert "\n" not in message and ".tmp" not in message
    assert "Patient p1" in message and str(a) in message and str(b) in message
    assert not (tmp_path / "out").exists()


def test_fhir_patient_in_a_bundle_and_ndjson_names_files(tmp_path, bundle_factory):
    bundle = bundle_factory()
    write_bundle(tmp_path / "fhir", dict(bundle, entry=bundle["entry"][:3]), "a.json")
    (tmp_path / "fhir" / "Observation.ndjson").write_text(json.dumps(bundle["entry"][3]["resource"]) + "\n")
    with pytest.raises(DataError, match=r"Patient p1 .*a\.json.*Observation\.ndjson"):
        prepare(tmp_path / "fhir", tmp_path / "out", PrepareConfig(format="fhir", tasks=[]), progress=False)

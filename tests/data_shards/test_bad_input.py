"""Bad input: a clear error naming file/row/field, or a documented, counted handling; never a half-written output."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
import polars as pl
import pytest

from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.errors import DataError
from ehrfm.data_shards.prepare import prepare
from ehrfm.data_shards.tasks import read_external_labels

from .conftest import write_bundle


def _no_output_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))


def _meds(root: Path, frame: pl.DataFrame, name: str = "0.parquet") -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    frame.write_parquet(root / "data" / name)
    return root


def _good_meds_frame(**overrides) -> pl.DataFrame:
    data = {
        "subject_id": [1, 1, 1, 2, 2],
        "time": [
            dt.datetime(1960, 1, 1),
            dt.datetime(2000, 1, 1),
            dt.datetime(2000, 1, 2),
            dt.datetime(1970, 1, 1),
            dt.datetime(2001, 1, 1),
        ],
        "code": ["MEDS_BIRTH", "ICD10CM/I50.9", "LOINC/1-1", "MEDS_BIRTH", "ICD10CM/E11.9"],
        "numeric_value": [None, None, 3.0, None, None],
    }
    data.update(overrides)
    return pl.DataFrame(data, schema_overrides={"numeric_value": pl.Float32})


def test_missing_column_names_file_and_column(tmp_path):
    root = _meds(tmp_path / "in", _good_meds_frame().drop("code"))
    with pytest.raises(DataError, match=r"0\.parquet.*code"):
        prepare(root, tmp_path / "out", PrepareConfig(tasks=[]), progress=False)
    _no_output_left(tmp_path / "out")


def test_mistyped_column_names_file_and_column(tmp_path):
    frame = _good_meds_frame().with_columns(pl.col("subject_id").cast(pl.String))
    root = _meds(tmp_path / "in", frame)
    with pytest.raises(DataError, match=r"0\.parquet.*subject_id"):
        prepare(root, tmp_path / "out", PrepareConfig(tasks=[]), progress=False)
    _no_output_left(tmp_path / "out")


def test_castable_types_are_accepted(tmp_path):
    frame = _good_meds_frame().with_columns(
        pl.col("time").cast(pl.Datetime("ns")), pl.col("numeric_value").cast(pl.Float64)
    )
    root = _meds(tmp_path / "in", frame)
    manifest = prepare(root, tmp_path / "out", PrepareConfig(tasks=[]), progress=False)
    assert manifest["counts"]["patients_total"] == 2


def test_counted_handling_of_duplicates_before_birth_after_death_and_empty(tmp_path):
    frame = pl.DataFrame(
        {
            "subject_id": [1, 1, 1, 1, 1, 1, 2, 2, 3],
            "time": [
                dt.datetime(1960, 1, 1),
                dt.datetime(1950, 1, 1),
                dt.datetime(2000, 1, 1),
                dt.datetime(2000, 1, 1),
                dt.datetime(2001, 1, 1),
                dt.datetime(2001, 3, 1),
                dt.datetime(1970, 1, 1),
                dt.datetime(1960, 1, 1),
                None,
            ],
            "code": [
                "MEDS_BIRTH",
                "SNOMED/1",
                "SNOMED/2",
                "SNOMED/2",
                "MEDS_DEATH",
                "SNOMED/3",
                "MEDS_BIRTH",
                "SNOMED/4",
                "GENDER/F",
            ],
        }
    )
    root = _meds(tmp_path / "in", frame)
    manifest = prepare(root, tmp_path / "out", PrepareConfig(tasks=[]), progress=False)
    dropped = manifest["cleaning"]["dropped_rows"]
    assert dropped == {"duplicate_rows": 1, "before_birth": 2, "after_death": 1}
    # subject 2 has only a birth left, subject 3 only a static code: both empty
    assert manifest["cleaning"]["dropped_subjects"] == {"empty_subjects": 2}
    assert manifest["counts"]["patients_total"] == 1


def test_subject_in_two_shards_is_an_error(tmp_path):
    root = _meds(tmp_path / "in", _good_meds_frame(), "0.parquet")
    _meds(root, _good_meds_frame(), "1.parquet")
    with pytest.raises(DataError, match=r"subject_id 1 appears in both .*0\.parquet and .*1\.parquet"):
        prepare(root, tmp_path / "out", PrepareConfig(tasks=[]), progress=False)
    _no_output_left(tmp_path / "out")


def test_not_a_meds_folder(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(DataError, match="no data/ folder"):
        prepare(tmp_path / "in", tmp_path / "out", PrepareConfig(tasks=[]), progress=False)


def test_unparseable_fhir_time_names_file_and_resource(tmp_path, bundle_factory):
    bundle = bundle_factory()
    bundle["entry"][2]["resource"]["onsetDateTime"] = "yesterday at noon"
    write_bundle(tmp_path / "fhir", bundle)
    with pytest.raises(DataError, match=r"p1\.json.*Condition/c1.*yesterday at noon"):
        prepare(tmp_path / "fhir", tmp_path / "out", PrepareConfig(format="fhir", tasks=[]), progress=False)
    _no_output_left(tmp_path / "out")


def test_truncated_and_non_utf8_json(tmp_path, bundle_factory):
    good = orjson.dumps(bundle_factory())
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cut.json").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.json: truncated or malformed JSON"):
        prepare(tmp_path / "a", tmp_path / "out", PrepareConfig(format="fhir", tasks=[]), progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "latin1.json").write_bytes(good.replace(b'"female"', b'"f\xe9male"'))
    with pytest.raises(DataError, match=r"latin1\.json: not valid UTF-8"):
        prepare(tmp_path / "b", tmp_path / "out", PrepareConfig(format="fhir", tasks=[]), progress=False)
    _no_output_left(tmp_path / "out")


def test_resource_without_code_is_dropped_and_tallied(tmp_path, bundle_factory):
    bundle = bundle_factory()
    del bundle["entry"][2]["resource"]["code"]  # the Condition
    write_bundle(tmp_path / "fhir", bundle)
    manifest = prepare(tmp_path / "fhir", tmp_path / "out", PrepareConfig(format="fhir", tasks=[]), progress=False)
    assert manifest["fhir"]["dropped"] == {"no_code": 1}
    example = manifest["fhir"]["dropped_examples"][0]
    assert example["resource"] == "Condition/c1" and example["file"].endswith("p1.json")


def test_empty_patient_bundle(tmp_path):
    write_bundle(
        tmp_path / "fhir",
        {
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Patient", "id": "lonely", "gender": "male"}}],
        },
    )
    with pytest.raises(DataError, match="no patient has any usable event"):
        prepare(tmp_path / "fhir", tmp_path / "out", PrepareConfig(format="fhir", tasks=[]), progress=False)
    _no_output_left(tmp_path / "out")


def test_ndjson_input_equals_bundle_input(tmp_path, bundle_factory):
    bundle = bundle_factory()
    write_bundle(tmp_path / "bundles", bundle)
    (tmp_path / "ndjson").mkdir()
    by_type: dict[str, list[bytes]] = {}
    for entry in bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(orjson.dumps(entry["resource"]))
    for kind, lines in by_type.items():
        (tmp_path / "ndjson" / f"{kind}.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    cfg = PrepareConfig(format="fhir", tasks=["demo"])
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test = 1.0, 0.0, 0.0
    a = prepare(tmp_path / "bundles", tmp_path / "a", cfg, progress=False)
    b = prepare(tmp_path / "ndjson", tmp_path / "b", cfg, progress=False)
    assert a["vocab_fingerprint"] == b["vocab_fingerprint"]
    assert [s["sha256"] for s in a["shards"]["pretrain"]] == [s["sha256"] for s in b["shards"]["pretrain"]]


def test_bad_ndjson_line_names_file_and_line(tmp_path):
    (tmp_path / "nd").mkdir()
    (tmp_path / "nd" / "Condition.ndjson").write_text('{"resourceType": "Condition"}\n{not json\n')
    with pytest.raises(DataError, match=r"Condition\.ndjson:2: invalid NDJSON line"):
        prepare(tmp_path / "nd", tmp_path / "out", PrepareConfig(format="fhir", tasks=[]), progress=False)


def test_external_labels_schema_errors(tmp_path):
    pl.DataFrame({"subject_id": [1], "boolean_value": [True]}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not in the MEDS label schema.*prediction_time"):
        read_external_labels(tmp_path / "bad.parquet")


def test_killed_prepare_leaves_no_complete_looking_folder(tmp_path, meds_dataset):
    """SIGKILL mid-run: `out` never appears; the next run removes the dead run's temp folder."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    code = (
        "import sys, time; from pathlib import Path\n"
        "import ehrfm.data_shards.prepare as p, ehrfm.data_shards.passes as passes\n"
        "orig = passes.build_sequences\n"
        "def slow(*a, **k):\n"
        "    print('tokenizing', flush=True); time.sleep(60); return orig(*a, **k)\n"
        "passes.build_sequences = slow\n"
        f"p.prepare(Path({str(meds_dataset)!r}), Path({str(out)!r}), p.PrepareConfig(tasks=[]), progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "tokenizing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert len(list(tmp_path.glob("out.tmp-*"))) == 1
    prepare(meds_dataset, out, PrepareConfig(tasks=[]), progress=False)
    assert (out / "manifest.json").exists() and not list(tmp_path.glob("out.tmp-*"))

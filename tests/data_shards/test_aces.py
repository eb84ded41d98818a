"""ACES task configs in `ehrfm prepare`: the shipped ACES versions of the demo tasks give the native labels on a
Synthea cohort, except where a stated rule differs (each difference is accounted for)."""

from __future__ import annotations

import polars as pl
import pytest

from ehrfm.data_shards.aces import resolve_aces_tasks
from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.errors import DataError
from ehrfm.data_shards.prepare import convert_fhir, prepare


def _all_labels(root, manifest, task) -> pl.DataFrame:
    files = manifest["tasks"][task]["files"]
    return pl.concat([pl.read_parquet(root / f["path"]) for f in files.values()]).sort("subject_id", "prediction_time")


@pytest.fixture(scope="module")
def aces_vs_native(synthea_fhir, tmp_path_factory):
    root = tmp_path_factory.mktemp("aces")
    convert_fhir(synthea_fhir, root / "meds", PrepareConfig(format="fhir"), progress=False)
    cfg = PrepareConfig(format="meds", tasks=["demo"], aces_tasks=["demo"])
    manifest = prepare(root / "meds", root / "data", cfg, progress=False)
    return root / "data", manifest, root / "meds"


def compare(native: pl.DataFrame, aces: pl.DataFrame) -> dict:
    joined = native.join(aces, on=["subject_id", "prediction_time"], how="full", coalesce=True, suffix="_aces")
    both = joined.filter(pl.col("boolean_value").is_not_null() & pl.col("boolean_value_aces").is_not_null())
    return {
        "both": both.height,
        "agree": int((both["boolean_value"] == both["boolean_value_aces"]).sum()),
        "native_only": joined.filter(pl.col("boolean_value_aces").is_null()).height,
        "aces_only": joined.filter(pl.col("boolean_value").is_null()).height,
        "both_frame": both,
    }


@pytest.mark.parametrize(
    ("native", "aces"), [("readmission_30d", "readmission_30d_aces"), ("mortality_1y", "mortality_1y_aces")]
)
def test_aces_demo_tasks_give_the_native_labels(aces_vs_native, native, aces):
    root, manifest, _ = aces_vs_native
    result = compare(_all_labels(root, manifest, native), _all_labels(root, manifest, aces))
    assert result["both"] > 0 and result["agree"] == result["both"]
    assert result["native_only"] == 0
    # ACES keeps what ehrfm excludes by rules ACES has no notion of: the dataset end (censored windows and
    # stays still open near it) and stays ending before they start
    excluded = manifest["tasks"][native]["excluded"]
    explained = sum(excluded.get(k, 0) for k in ("censored", "open_stay", "negative_stay"))
    assert result["aces_only"] <= explained, (result, excluded)
    assert manifest["tasks"][aces]["labels"] == result["both"] + result["aces_only"]


def test_aces_gives_the_complement_of_length_of_stay(aces_vs_native):
    """ACES cannot negate: 'discharged within 7 days' is the complement of ehrfm's los_7d on the same stays."""
    root, manifest, _ = aces_vs_native
    result = compare(_all_labels(root, manifest, "los_7d"), _all_labels(root, manifest, "discharged_7d_aces"))
    assert result["both"] > 0
    assert (result["both_frame"]["boolean_value"] != result["both_frame"]["boolean_value_aces"]).all()
    assert result["native_only"] == 0


def test_aces_task_specs_are_checked(tmp_path):
    assert [name for name, _ in resolve_aces_tasks(["demo"])] == [
        "discharged_7d_aces",
        "mortality_1y_aces",
        "readmission_30d_aces",
    ]
    with pytest.raises(DataError, match="neither an ACES task YAML"):
        resolve_aces_tasks([str(tmp_path / "missing.yaml")])
    (tmp_path / "30d.yaml").write_text("trigger: hospital_discharge\n")
    assert resolve_aces_tasks([f"readmission_30d={tmp_path / '30d.yaml'}"]) == [
        ("readmission_30d", tmp_path / "30d.yaml")
    ]
    with pytest.raises(DataError, match="two tasks named"):
        resolve_aces_tasks([str(tmp_path / "30d.yaml"), f"30d={tmp_path / '30d.yaml'}"])


# A task written the way MEDS-DEV writes its tasks: predicates left to the dataset (``???``), a window looking
# back to the previous admission, and a window after the target requiring later data (censoring protection).
MEDS_DEV_STYLE = """
predicates:
  hospital_admission:
    code: ???
  hospital_discharge:
    code: ???
trigger: hospital_discharge
windows:
  input:
    start: NULL
    end: trigger
    start_inclusive: True
    end_inclusive: True
    index_timestamp: end
  stay:
    start: end <- hospital_admission
    end: trigger
    start_inclusive: True
    end_inclusive: True
  target:
    start: trigger
    end: start + 30d
    start_inclusive: False
    end_inclusive: True
    label: hospital_admission
  later_data:
    start: target.end
    end: null
    start_inclusive: False
    end_inclusive: True
    has:
      _ANY_EVENT: (1, None)
"""


def test_a_meds_dev_style_task_runs_unchanged_with_the_synthea_predicates(aces_vs_native, tmp_path):
    from ehrfm.data_shards.aces import aces_labels, resolve_predicates

    root, manifest, meds_root = aces_vs_native
    (tmp_path / "30d.yaml").write_text(MEDS_DEV_STYLE)
    labels = aces_labels(tmp_path / "30d.yaml", meds_root, resolve_predicates("synthea"), tmp_path / "work")
    assert labels.columns == ["subject_id", "prediction_time", "boolean_value"] and labels.height > 0
    # the rows are discharges ehrfm's own readmission task labels too, with the same labels; ACES drops the
    # discharges without later data, and keeps only those ehrfm excludes for its dataset-end rules
    native = _all_labels(root, manifest, "readmission_30d").join(
        labels, on=["subject_id", "prediction_time"], how="inner", suffix="_dev"
    )
    assert native.height > 0 and (native["boolean_value"] == native["boolean_value_dev"]).all()
    excluded = manifest["tasks"]["readmission_30d"]["excluded"]
    assert labels.height - native.height <= sum(excluded.get(k, 0) for k in ("censored", "open_stay", "negative_stay"))


def test_aces_tasks_on_fhir_input_run_over_the_events_folder(synthea_fhir, aces_vs_native, tmp_path):
    """With FHIR input ACES reads OUT/events/: the same labels as the MEDS route."""
    root, manifest, _ = aces_vs_native
    cfg = PrepareConfig(format="fhir", tasks=[], aces_tasks=[f"mortality_1y_aces={resolve_aces_tasks(['demo'])[1][1]}"])
    direct = prepare(synthea_fhir, tmp_path / "data", cfg, progress=False)
    via_meds = _all_labels(root, manifest, "mortality_1y_aces")
    assert _all_labels(tmp_path / "data", direct, "mortality_1y_aces").equals(via_meds)

"""`ehrfm prepare` on real generated data: meds-testing-helpers MEDS and a Synthea FHIR cohort."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import yaml
from transformers import AutoTokenizer

from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.errors import DataError
from ehrfm.data_shards.prepare import prepare
from ehrfm.data_shards.schema import CLS, REG, VE, VS
from ehrfm.data_shards.shards import file_sha256
from ehrfm.data_shards.splits import SPLITS
from ehrfm.data_shards.stream import ShardReader


def _subjects(out: Path, manifest: dict) -> dict[str, list[int]]:
    result = {}
    for split, shards in manifest["shards"].items():
        ids = []
        for shard in shards:
            table = pa.ipc.open_file(pa.memory_map(str(out / shard["path"]))).read_all()
            ids += table.column("subject_id").to_pylist()
        result[split] = ids
    return result


def test_meds_prepare_splits_and_tokenizer(meds_dataset, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(meds_dataset, out, PrepareConfig(format="meds"), progress=False)
    subjects = _subjects(out, manifest)
    all_ids = [s for ids in subjects.values() for s in ids]
    assert len(all_ids) == len(set(all_ids)) == manifest["counts"]["patients_total"]
    source_ids = pl.read_parquet(meds_dataset / "data" / "*.parquet")["subject_id"].unique().to_list()
    assert sorted(all_ids) == sorted(source_ids)
    # MEDS held_out subjects all land in our test split
    given = pl.read_parquet(meds_dataset / "metadata" / "subject_splits.parquet")
    held_out = set(given.filter(pl.col("split") == "held_out")["subject_id"].to_list())
    assert held_out and held_out == set(subjects["test"])
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tok) == manifest["vocab_size"]
    assert yaml.safe_load((out / "config.yaml").read_text())["format"] == "meds"
    for split in SPLITS:
        for shard in manifest["shards"][split]:
            assert file_sha256(out / shard["path"]) == shard["sha256"]


def test_prepare_is_deterministic(meds_dataset, tmp_path):
    a = prepare(meds_dataset, tmp_path / "a", PrepareConfig(), progress=False)
    b = prepare(meds_dataset, tmp_path / "b", PrepareConfig(), progress=False)
    sums = lambda m: [s["sha256"] for split in SPLITS for s in m["shards"][split]]  # noqa: E731
    assert sums(a) == sums(b) and a["vocab_fingerprint"] == b["vocab_fingerprint"]
    assert a["source"]["fingerprint"] == b["source"]["fingerprint"]


def test_split_seed_changes_assignment_but_not_membership(meds_dataset, tmp_path):
    cfg = PrepareConfig()
    cfg.splits.respect_meds_splits = False
    a = _subjects(tmp_path / "a", prepare(meds_dataset, tmp_path / "a", cfg, progress=False))
    cfg.splits.seed = 1
    b = _subjects(tmp_path / "b", prepare(meds_dataset, tmp_path / "b", cfg, progress=False))
    assert sorted(sum(a.values(), [])) == sorted(sum(b.values(), []))
    assert a["pretrain"] != b["pretrain"]


def test_synthea_sequences_have_visit_structure(synthea_prepared):
    out, manifest = synthea_prepared
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = {t: tok.convert_tokens_to_ids(t) for t in (CLS, VS, VE, REG)}
    n_checked = 0
    for shards in manifest["shards"].values():
        if not shards:
            continue
        reader = ShardReader(out, shards)
        for row in range(len(reader)):
            s = reader.get(row)
            ids_ = s["input_ids"]
            assert ids_[0] == ids[CLS]
            lengths = {len(v) for k, v in s.items() if isinstance(v, np.ndarray) and v.ndim == 1}
            assert len(lengths) == 1  # all streams aligned
            vs, ve, reg = (np.flatnonzero(ids_ == ids[t]) for t in (VS, VE, REG))
            assert len(vs) == len(ve) == len(reg) == s["visit_orders"].max()
            assert np.all(reg == ve + 1) and np.all(vs < ve)
            assert set(np.unique(s["visit_segments"][1:])) <= {0, 1, 2}
            n_checked += 1
    assert n_checked == manifest["counts"]["patients_total"] >= 5
    assert manifest["fhir"]["resources"]["Patient"] == 6
    assert manifest["cleaning"]["dropped_rows"].get("duplicate_rows", 0) > 0  # Synthea repeats vitals
    assert manifest["tasks"]["los_7d"]["labels"] > 0


def test_cli_prepare_writes_resolved_config(meds_dataset, tmp_path):
    exe = Path(sys.executable).with_name("ehrfm")
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            str(exe),
            "prepare",
            "--input",
            str(meds_dataset),
            "--format",
            "meds",
            "--out",
            str(out),
            "--no-progress",
            "vocab.num_bins=5",
            "splits.seed=4",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["vocab"]["num_bins"] == 5 and resolved["splits"]["seed"] == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["vocab"]["num_bins"] == 5
    bad = subprocess.run(
        [str(exe), "prepare", "--input", str(meds_dataset), "--out", str(tmp_path / "x"), "vocab.nope=1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "vocab.nope" in bad.stderr
    assert not (tmp_path / "x").exists()


# Files whose only run-to-run differences are wall-clock facts: (file, keys that may differ).
_WALL_CLOCK_FIELDS = {
    "manifest.json": ("seconds",),
    ".ehrfm-output.json": ("pid", "written_at"),
    "events/metadata/dataset.json": ("created_at",),
}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        data = path.read_bytes()
        if rel in _WALL_CLOCK_FIELDS:
            record = json.loads(data)
            for key in _WALL_CLOCK_FIELDS[rel]:
                record.pop(key, None)
            data = json.dumps(record, sort_keys=True).encode()
        files[rel] = data
    return files


def test_jobs_write_the_same_bytes_for_any_n(synthea_fhir, meds_dataset, tmp_path):
    """`ehrfm prepare --jobs N`: every file of the output (MEDS events, shards, labels, tokenizer, manifest)
    is the same bytes for N = 1 and N = 3, from FHIR (3 bundle groups) and from MEDS; only wall-clock fields
    differ."""
    cfg = PrepareConfig(format="fhir", tasks=["demo", "heart_failure"])
    cfg.shards.fhir_bundles_per_shard = 2  # 6 patients -> 3 groups, i.e. 3 MEDS shards for the passes
    cfg.shards.patients_per_shard = 2
    one = prepare(synthea_fhir, tmp_path / "fhir-1", cfg, progress=False, jobs=1)
    three = prepare(synthea_fhir, tmp_path / "fhir-3", cfg, progress=False, jobs=3)
    assert len(list((tmp_path / "fhir-1" / "events" / "data").glob("*.parquet"))) == 3
    assert one["counts"] == three["counts"]
    assert _tree_bytes(tmp_path / "fhir-1") == _tree_bytes(tmp_path / "fhir-3")
    meds = PrepareConfig(format="meds")
    prepare(meds_dataset, tmp_path / "meds-1", meds, progress=False, jobs=1)
    prepare(meds_dataset, tmp_path / "meds-2", meds, progress=False, jobs=2)
    assert _tree_bytes(tmp_path / "meds-1") == _tree_bytes(tmp_path / "meds-2")


def test_a_patient_split_over_bundle_groups_is_an_error_with_jobs(synthea_fhir, tmp_path):
    """The bundle-owner check spans the groups that different processes converted."""
    src = tmp_path / "fhir"
    src.mkdir()
    bundles = sorted(synthea_fhir.glob("*.json"))[:3]
    for path in bundles:
        shutil.copy(path, src / path.name)
    shutil.copy(bundles[0], src / "zz-copy-of-the-first.json")  # sorts last: another group than the original
    cfg = PrepareConfig(format="fhir", tasks=[])
    cfg.shards.fhir_bundles_per_shard = 2
    with pytest.raises(DataError, match=r"is split over two bundle files, .*zz-copy-of-the-first\.json"):
        prepare(src, tmp_path / "out", cfg, progress=False, jobs=2)
    assert not (tmp_path / "out").exists()

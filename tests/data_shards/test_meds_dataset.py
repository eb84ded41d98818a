"""The MEDS dataset written from FHIR: valid under the ``meds`` schemas, with metadata, and a faithful
intermediate (preparing it as MEDS gives the FHIR run's corpus)."""

from __future__ import annotations

import json

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from ehrfm.cli import main
from ehrfm.data_shards import meds_dataset
from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.errors import DataError
from ehrfm.data_shards.prepare import convert_fhir, prepare
from ehrfm.data_shards.stream import ShardReader


def test_meds_only_writes_a_valid_meds_dataset_with_metadata(synthea_fhir, tmp_path):
    out = tmp_path / "meds"
    assert main(["prepare", "--format", "fhir", "--meds-only", "--input", str(synthea_fhir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "conversion.json",
        "data",
        "metadata",
    ]
    counts = meds_dataset.validate(out)
    assert counts["subjects"] == 6 and counts["shards"] == 1
    for path in (out / "data").glob("*.parquet"):
        meds.DataSchema.validate(pq.read_schema(path))  # strict: code is string, not large_string
    dataset = json.loads((out / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(dataset)
    assert dataset["etl_name"] == "ehrfm" and dataset["meds_version"].startswith("0.4")
    codes = pl.read_parquet(out / meds.code_metadata_filepath)
    data = pl.concat([pl.read_parquet(p) for p in (out / "data").glob("*.parquet")])
    assert set(codes["code"]) == set(data["code"])
    # Synthea's codings carry display texts: they become the descriptions
    described = dict(codes.select("code", "description").iter_rows())
    assert described["MEDS_DEATH"] is None or isinstance(described["MEDS_DEATH"], str)
    assert sum(v is not None for v in described.values()) > 0.5 * len(described)
    splits = pl.read_parquet(out / meds.subject_splits_filepath)
    assert set(splits["split"]) <= {"train", "tuning", "held_out"}
    assert sorted(splits["subject_id"]) == sorted(data["subject_id"].unique())


def test_prepared_meds_folder_gives_the_fhir_corpus(synthea_fhir, tmp_path):
    """FHIR -> prepare equals FHIR -> MEDS (``--meds-only``) -> prepare: same tokens, streams and labels."""
    cfg = PrepareConfig(format="fhir", tasks=["demo"])
    cfg.splits.respect_meds_splits = False
    direct = prepare(synthea_fhir, tmp_path / "direct", cfg, progress=False)
    main(["prepare", "--format", "fhir", "--meds-only", "--input", str(synthea_fhir), "--out", str(tmp_path / "m")])
    cfg.format = "meds"
    via_meds = prepare(tmp_path / "m", tmp_path / "via", cfg, progress=False)
    assert direct["counts"]["patients"] == via_meds["counts"]["patients"]
    assert direct["vocab_size"] == via_meds["vocab_size"]
    for split, shards in direct["shards"].items():
        a, b = ShardReader(tmp_path / "direct", shards), ShardReader(tmp_path / "via", via_meds["shards"][split])
        assert len(a) == len(b)
        for i in range(len(a)):
            x, y = a.get(i), b.get(i)
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{split}[{i}].{key}")
    for task, tally in direct["tasks"].items():
        for split in tally["files"]:
            left = pl.read_parquet(tmp_path / "direct" / "labels" / task / f"{split}.parquet")
            right = pl.read_parquet(tmp_path / "via" / "labels" / task / f"{split}.parquet")
            assert left.equals(right), (task, split)
    meds_dataset.validate(tmp_path / "direct" / "events")  # the full prepare's events/ is a MEDS dataset too


def test_invalid_meds_metadata_is_named(synthea_fhir, tmp_path):
    out = tmp_path / "meds"
    main(["prepare", "--format", "fhir", "--meds-only", "--input", str(synthea_fhir), "--out", str(out)])
    splits = out / meds.subject_splits_filepath
    renamed = pl.read_parquet(splits).with_columns(split=pl.lit("pretrain"))
    pq.write_table(meds.SubjectSplitSchema.align(renamed.to_arrow()), splits)
    with pytest.raises(DataError, match="subject_splits.parquet.*pretrain"):
        meds_dataset.validate(out)
    with pytest.raises(DataError, match="--format fhir"):
        convert_fhir(out, tmp_path / "x", PrepareConfig(format="meds"))
    assert not (tmp_path / "x").exists()


def test_meds_reader_accepts_the_meds_dataset(synthea_fhir, tmp_path):
    """meds-reader (the MEDS ecosystem's fast reader) converts the folder, its verifier finds the database equal to
    the source, and it sees every subject and event."""
    import subprocess
    import sys
    from pathlib import Path

    import meds_reader

    out = tmp_path / "meds"
    main(["prepare", "--format", "fhir", "--meds-only", "--input", str(synthea_fhir), "--out", str(out)])
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "meds_reader_convert"), str(out), str(tmp_path / "db")], check=True)
    verified = subprocess.run(
        [str(bin_dir / "meds_reader_verify"), str(out), str(tmp_path / "db")], capture_output=True, text=True
    )
    assert verified.returncode == 0 and "Test passed" in verified.stdout + verified.stderr
    data = pl.concat([pl.read_parquet(p) for p in (out / "data").glob("*.parquet")])
    database = meds_reader.SubjectDatabase(str(tmp_path / "db"))
    assert sorted(database) == sorted(data["subject_id"].unique().to_list())
    first = sorted(database)[0]
    assert len(database[first].events) == data.filter(pl.col("subject_id") == first).height

"""The MEDS dataset ehrfm writes from FHIR input, laid out and validated as MEDS 0.4 specifies.

``ehrfm prepare --format fhir`` converts FHIR into a MEDS folder (``OUT/events/``; with ``--meds-only`` the
output folder itself) that other MEDS tools (ACES, MEDS-Tab, meds-reader) accept:

* ``data/<i>.parquet`` -- whole subjects per shard, sorted by (subject_id, time), the columns of
  :class:`meds.DataSchema` in its types (``code`` string, ``numeric_value`` float32, ``text_value`` large
  string) plus two extra columns MEDS allows: ``encounter_id`` and ``event_type``;
* ``metadata/dataset.json`` -- :class:`meds.DatasetMetadataSchema`: name, version (the source fingerprint),
  ETL name/version, the MEDS version, creation time, the extra columns declared;
* ``metadata/codes.parquet`` -- :class:`meds.CodeMetadataSchema`: every code of the data, with the FHIR
  coding's display text as description where the data has one (parent codes empty: FHIR bundles carry no
  hierarchy);
* ``metadata/subject_splits.parquet`` -- :class:`meds.SubjectSplitSchema`: ehrfm's split of each subject
  mapped to MEDS names (pretrain/finetune -> ``train``, their validation slices -> ``tuning``, test ->
  ``held_out``). The mapping keeps test = held_out exactly; preparing this MEDS folder again with
  ``splits.respect_meds_splits`` re-divides ``train`` between pretrain and finetune by the ratio of their
  fractions (``splits.assign_splits``), which need not repeat the FHIR run's division.

Every file is checked with the ``meds`` package's schemas before the folder is used (:func:`validate`).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError

ETL_NAME = "ehrfm"
EXTRA_COLUMNS = ("encounter_id", "event_type")
EHRFM_TO_MEDS_SPLIT = {
    "pretrain": meds.train_split,
    "finetune": meds.train_split,
    "pretrain_val": meds.tuning_split,
    "finetune_val": meds.tuning_split,
    "test": meds.held_out_split,
}


def write_shard(frame: pl.DataFrame, path: Path) -> None:
    """Events of whole subjects -> one MEDS data shard, typed as :class:`meds.DataSchema` (extra columns kept)."""
    table = meds.DataSchema.align(frame.sort("subject_id", "time", nulls_last=False).to_arrow())
    pq.write_table(table, path)


def source_of(data_dir: Path, manifest: dict) -> Path:
    """The MEDS folder a prepared data folder was made from: its ``events/`` for FHIR input, else the input."""
    if manifest["source"]["format"] == "fhir":
        return Path(data_dir) / "events"
    return Path(manifest["source"]["path"])


def write_metadata(
    root: Path,
    *,
    source: Path,
    dataset_version: str,
    subject_splits: pl.DataFrame,
    code_names: dict[str, str],
) -> None:
    """Write ``metadata/`` of the MEDS folder ``root`` (its ``data/`` already written) converted from the FHIR
    folder ``source``. ``subject_splits``: subject_id and ehrfm split names; ``code_names``: code ->
    description where known."""
    from ehrfm import __version__

    folder = Path(root) / "metadata"
    folder.mkdir(parents=True, exist_ok=True)
    dataset = {
        "dataset_name": f"ehrfm FHIR conversion of {Path(source).name}",
        "dataset_version": dataset_version,
        "etl_name": ETL_NAME,
        "etl_version": __version__,
        "meds_version": _meds_version(),
        "created_at": dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(timespec="seconds"),
        "raw_source_id_columns": ["encounter_id"],
        "other_extension_columns": ["event_type"],
    }
    meds.DatasetMetadataSchema.validate(dataset)
    (Path(root) / meds.dataset_metadata_filepath).write_text(json.dumps(dataset, indent=2) + "\n")
    codes = sorted(_data_codes(Path(root)))
    code_table = pa.table(
        {
            "code": pa.array(codes, pa.string()),
            "description": pa.array([code_names.get(c) for c in codes], pa.string()),
            "parent_codes": pa.array([[] for _ in codes], pa.list_(pa.string())),
        }
    )
    pq.write_table(meds.CodeMetadataSchema.align(code_table), Path(root) / meds.code_metadata_filepath)
    splits = subject_splits.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("split").replace_strict(EHRFM_TO_MEDS_SPLIT, return_dtype=pl.String),
    ).sort("subject_id")
    pq.write_table(meds.SubjectSplitSchema.align(splits.to_arrow()), Path(root) / meds.subject_splits_filepath)


def validate(root: Path) -> dict:
    """Check a MEDS folder with the ``meds`` schemas: every data shard (schema), dataset.json, codes.parquet
    and subject_splits.parquet (schema and content). Returns counts; raises DataError naming the file."""
    root = Path(root)
    shards = sorted((root / meds.data_subdirectory).rglob("*.parquet"))
    if not shards:
        raise DataError(f"{root}: no MEDS data shards under {meds.data_subdirectory}/")
    for path in shards:
        _check(meds.DataSchema, pq.read_schema(path), path)
    dataset_path = root / meds.dataset_metadata_filepath
    try:
        meds.DatasetMetadataSchema.validate(json.loads(dataset_path.read_text()))
    except (OSError, ValueError) as err:
        raise DataError(f"{dataset_path}: not a readable MEDS dataset.json ({err})") from None
    except Exception as err:  # noqa: BLE001 - flexible_schema's validation errors
        raise DataError(f"{dataset_path}: invalid MEDS dataset metadata ({err})") from None
    codes = root / meds.code_metadata_filepath
    _check(meds.CodeMetadataSchema, pq.read_table(codes), codes)
    splits_path = root / meds.subject_splits_filepath
    splits = pq.read_table(splits_path)
    _check(meds.SubjectSplitSchema, splits, splits_path)
    names = set(splits.column("split").to_pylist())
    unknown = names - {meds.train_split, meds.tuning_split, meds.held_out_split}
    if unknown:
        raise DataError(f"{splits_path}: split names {sorted(unknown)} are not MEDS split names")
    return {"shards": len(shards), "codes": pq.read_metadata(codes).num_rows, "subjects": splits.num_rows}


def _check(schema, table, path: Path) -> None:
    try:
        schema.validate(table)
    except Exception as err:  # noqa: BLE001 - flexible_schema's validation errors
        raise DataError(f"{path}: does not match the MEDS {schema.__name__} ({err})") from None


def _data_codes(root: Path) -> set[str]:
    codes: set[str] = set()
    for path in sorted((root / meds.data_subdirectory).rglob("*.parquet")):
        codes.update(pl.read_parquet(path, columns=["code"])["code"].unique().to_list())
    return codes


def _meds_version() -> str:
    from importlib.metadata import version

    return version("meds")

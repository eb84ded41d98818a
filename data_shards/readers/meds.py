"""MEDS reader: a folder ``data/**/*.parquet`` (+ ``metadata/``) streamed shard by shard.

The schema of every shard is checked with the ``meds`` package's :class:`meds.DataSchema` before reading.
Safe widenings are accepted and cast (``timestamp[ns|ms|s]`` -> ``timestamp[us]``, ``float64`` ->
``float32``, integer subject ids -> ``int64``, ``large_string`` -> ``string``); anything else is an error
naming the file, the columns expected and found, the MEDS version ehrfm reads (that of the installed ``meds``
package, 0.4.x) and the version the dataset declares in ``metadata/dataset.json`` (MEDS renamed columns between
versions, e.g. ``patient_id`` -> ``subject_id`` and ``timestamp`` -> ``time`` in 0.3). MEDS keeps each subject in
one shard; a subject seen in two shards is an error (we rely on it to stream without a global sort).
"""

from __future__ import annotations

import json
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from . import EVENT_SCHEMA

EXTRA_COLUMNS = ("encounter_id", "event_type")


def list_meds_shards(root: Path) -> list[Path]:
    root = Path(root)
    data_dir = root / meds.data_subdirectory
    if not data_dir.is_dir():
        raise DataError(f"{root}: not a MEDS dataset (no {meds.data_subdirectory}/ folder)")
    shards = sorted(data_dir.rglob("*.parquet"))
    if not shards:
        raise DataError(f"{data_dir}: no parquet shards found")
    return shards


def _castable(field: pa.Field, want: pa.DataType) -> bool:
    t = field.type
    if pa.types.is_timestamp(want):
        return pa.types.is_timestamp(t) or pa.types.is_date(t)
    if pa.types.is_floating(want):
        return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)
    if pa.types.is_integer(want):
        return pa.types.is_integer(t)
    if pa.types.is_string(want) or pa.types.is_large_string(want):
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
    return False


_WANT = {
    "subject_id": pa.int64(),
    "time": pa.timestamp("us"),
    "code": pa.string(),
    "numeric_value": pa.float32(),
    "text_value": pa.large_string(),
}


def meds_versions(root: Path | None) -> str:
    """'ehrfm reads MEDS <x> (...)' plus the version the dataset at ``root`` declares, for error messages."""
    from importlib.metadata import version

    text = f"ehrfm reads MEDS {version('meds')} (meds package)"
    path = Path(root) / meds.dataset_metadata_filepath if root is not None else None
    if path is not None and path.is_file():
        try:
            declared = json.loads(path.read_text()).get("meds_version")
        except (OSError, ValueError, AttributeError):
            declared = None
        text += f"; the dataset declares meds_version {declared!r}" if declared else "; the dataset declares none"
    return text


def check_schema(path: Path, root: Path | None = None) -> pa.Schema:
    """Validate a shard's schema with meds.DataSchema; return it if it is valid or safely castable. ``root``
    (the dataset folder) lets errors name the MEDS version the dataset declares."""
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    try:
        meds.DataSchema.validate(schema)
        return schema
    except Exception as err:  # noqa: BLE001 - flexible_schema's error type; re-checked below
        message = str(err)
    missing = [c for c in ("subject_id", "time", "code") if c not in schema.names]
    if missing:
        raise DataError(
            f"{path}: missing required MEDS column(s) {missing}; found {schema.names}; {meds_versions(root)} "
            f"({message})"
        )
    bad = [
        f"{name} ({schema.field(name).type}, want {want})"
        for name, want in _WANT.items()
        if name in schema.names and not _castable(schema.field(name), want)
    ]
    if bad:
        raise DataError(f"{path}: mistyped MEDS column(s): {', '.join(bad)}; {meds_versions(root)}")
    return schema


def read_meds_shard(path: Path, root: Path | None = None) -> pl.DataFrame:
    """One shard as a DataFrame with MEDS columns (typed) plus the optional extra columns we use."""
    schema = check_schema(path, root)
    columns = [c for c in (*_WANT, *EXTRA_COLUMNS) if c in schema.names]
    try:
        frame = pl.read_parquet(path, columns=columns)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot read parquet data ({err})") from None
    frame = frame.with_columns([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items() if c in frame.columns])
    if frame["time"].dtype != pl.Datetime("us", None):
        frame = frame.with_columns(pl.col("time").dt.replace_time_zone(None))
    for name, dtype in EVENT_SCHEMA.items():
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
    return frame.select(list(EVENT_SCHEMA))


def read_subject_splits(root: Path) -> pl.DataFrame | None:
    path = Path(root) / meds.subject_splits_filepath
    if not path.exists():
        return None
    frame = pl.read_parquet(path)
    if not {"subject_id", "split"} <= set(frame.columns):
        raise DataError(f"{path}: needs columns subject_id and split, found {frame.columns}")
    return frame.select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))

"""Documented, counted handling of bad rows in a MEDS-shaped event table.

Rows are dropped, or a single field is rewritten (never silently): each rule adds to a :class:`Tally` that
ends up in manifest.json under "cleaning" (``dropped_rows``, ``dropped_subjects`` and ``notes`` counters).

=============================  =================================================================
rule                           handling
=============================  =================================================================
null subject_id / code         dropped ("null_subject_or_code")
implausible event time         dropped when not ``cleaning.min_time <= time < cleaning.max_time``
                               (defaults 1900-01-01 and 2300-01-01; "time_out_of_bounds"); static
                               rows (null time) are kept. A MEDS_BIRTH/MEDS_DEATH row out of bounds
                               is dropped like any other row (the subject then has no birth/death)
non-finite numeric_value       NaN, +-inf and float64 values beyond float32's range (they become
                               inf when read as float32) are set to null: the event stays as a
                               coded event without a value (notes "non_finite_numeric_values")
code spelled like a reserved   a code equal to a special token (``[PAD]``, ``[CLS]``, ...) or to a
token                          task token (``[MOR]``, ...), or already starting with the escape
                               prefix, gets the prefix ``CODE//`` (``[PAD]`` -> ``CODE//[PAD]``):
                               an ordinary code token, never a special id (notes
                               "escaped_reserved_codes"; :data:`.schema.ESCAPED_CODE_PREFIX`)
exact duplicate rows           dropped ("duplicate_rows")
events before birth            dropped ("before_birth"); birth = the subject's MEDS_BIRTH time,
                               compared at day resolution (FHIR birthDate has no time of day)
events after death             dropped when later than death + tolerance ("after_death")
static rows (null time)        kept: placed after [CLS] (e.g. GENDER/F)
subjects with no event left    dropped ("empty_subjects", counted in subjects)
events after the data end      kept, counted (notes "events_after_data_end"; the data end and its
                               rule are in manifest "data_end" / "data_end_rule", see
                               :func:`.prepare.derive_data_end`)
=============================  =================================================================
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable

import meds
import polars as pl

from .config import CleaningConfig, parse_time
from .schema import ESCAPED_CODE_PREFIX, SPECIAL_TOKENS


@dataclasses.dataclass
class Tally:
    rows_in: int = 0
    rows_out: int = 0
    subjects_in: int = 0
    subjects_out: int = 0
    dropped_rows: Counter = dataclasses.field(default_factory=Counter)
    dropped_subjects: Counter = dataclasses.field(default_factory=Counter)
    notes: Counter = dataclasses.field(default_factory=Counter)

    def merge(self, other: Tally) -> None:
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.subjects_in += other.subjects_in
        self.subjects_out += other.subjects_out
        self.dropped_rows.update(other.dropped_rows)
        self.dropped_subjects.update(other.dropped_subjects)
        self.notes.update(other.notes)

    def to_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "subjects_in": self.subjects_in,
            "subjects_out": self.subjects_out,
            "dropped_rows": dict(self.dropped_rows),
            "dropped_subjects": dict(self.dropped_subjects),
            "notes": dict(self.notes),
        }


def _drop(frame: pl.DataFrame, keep: pl.Expr, reason: str, tally: Tally) -> pl.DataFrame:
    kept = frame.filter(keep)
    if kept.height != frame.height:
        tally.dropped_rows[reason] += frame.height - kept.height
    return kept


def _rewrite(frame: pl.DataFrame, where: pl.Expr, column: str, value: pl.Expr, note: str, tally: Tally) -> pl.DataFrame:
    hits = int(frame.select(where.sum()).item() or 0)
    if not hits:
        return frame
    tally.notes[note] += hits
    return frame.with_columns(pl.when(where).then(value).otherwise(pl.col(column)).alias(column))


def escape_reserved_codes(code: pl.Expr, reserved: Iterable[str]) -> tuple[pl.Expr, pl.Expr]:
    """(rows to escape, escaped code): codes equal to a reserved token or starting with the escape prefix."""
    hit = code.is_in(sorted(set(reserved))) | code.str.starts_with(ESCAPED_CODE_PREFIX)
    return hit, pl.lit(ESCAPED_CODE_PREFIX) + code


def clean_events(
    frame: pl.DataFrame, cfg: CleaningConfig, tally: Tally, reserved_codes: Iterable[str] = SPECIAL_TOKENS
) -> pl.DataFrame:
    """Apply the rules above; adds per-subject ``birth`` and ``death`` columns (datetime, nullable).

    ``reserved_codes``: token strings an input code must not be spelled as (the special tokens and the
    run's task tokens); such codes are escaped.
    """
    tally.rows_in += frame.height
    subjects_in = frame["subject_id"].n_unique()
    tally.subjects_in += subjects_in
    frame = _drop(
        frame, pl.col("subject_id").is_not_null() & pl.col("code").is_not_null(), "null_subject_or_code", tally
    )
    low, high = parse_time(cfg.min_time, "cleaning.min_time"), parse_time(cfg.max_time, "cleaning.max_time")
    frame = _drop(
        frame,
        pl.col("time").is_null() | ((pl.col("time") >= low) & (pl.col("time") < high)),
        "time_out_of_bounds",
        tally,
    )
    value = pl.col("numeric_value")
    frame = _rewrite(
        frame,
        value.is_not_null() & ~value.is_finite(),
        "numeric_value",
        pl.lit(None, dtype=frame.schema["numeric_value"]),
        "non_finite_numeric_values",
        tally,
    )
    escape, escaped = escape_reserved_codes(pl.col("code"), reserved_codes)
    frame = _rewrite(frame, escape, "code", escaped, "escaped_reserved_codes", tally)
    if cfg.drop_duplicates:
        before = frame.height
        frame = frame.unique(
            subset=["subject_id", "time", "code", "numeric_value", "text_value"], keep="first", maintain_order=True
        )
        if frame.height != before:
            tally.dropped_rows["duplicate_rows"] += before - frame.height
    life = frame.group_by("subject_id").agg(
        birth=pl.col("time").filter(pl.col("code") == meds.birth_code).min(),
        death=pl.col("time").filter(pl.col("code") == meds.death_code).min(),
    )
    frame = frame.join(life, on="subject_id", how="left")
    if cfg.drop_before_birth:
        frame = _drop(
            frame,
            pl.col("time").is_null()
            | pl.col("birth").is_null()
            | (pl.col("time").dt.date() >= pl.col("birth").dt.date()),
            "before_birth",
            tally,
        )
    tolerance = pl.duration(microseconds=int(cfg.after_death_tolerance_hours * 3600 * 1e6))
    frame = _drop(
        frame,
        pl.col("time").is_null() | pl.col("death").is_null() | (pl.col("time") <= pl.col("death") + tolerance),
        "after_death",
        tally,
    )
    no_birth = life.filter(pl.col("birth").is_null()).height
    if no_birth:
        tally.notes["subjects_without_birth (age set to 0)"] += no_birth
    counts = frame.group_by("subject_id").agg(
        n=(pl.col("time").is_not_null() & (pl.col("code") != meds.birth_code)).sum()
    )
    keep_ids = counts.filter(pl.col("n") >= cfg.min_events_per_patient)["subject_id"]
    frame = frame.filter(pl.col("subject_id").is_in(keep_ids.implode()))
    subjects_out = frame["subject_id"].n_unique()
    if subjects_out != subjects_in:
        tally.dropped_subjects["empty_subjects"] += subjects_in - subjects_out
    tally.subjects_out += subjects_out
    tally.rows_out += frame.height
    return frame

"""Clinical task labels defined in config, computed without leakage.

A task = an *anchor* (e.g. the discharge of an inpatient encounter), a *prediction time* (anchor + offset),
a label *window* after the prediction time and an *outcome* (death, start of an encounter of a class, a
code, or the anchor stay lasting longer than N days). Labels follow the MEDS label schema
(``subject_id, prediction_time, boolean_value``); model inputs for a label contain only tokens whose event
time is strictly before ``prediction_time`` (stricter than MEDS' "up to and including", so that events
stamped at the prediction instant, e.g. discharge orders, never leak).

Exclusions (counted per task in the manifest):
* stays with end before start ("negative_stay"), without an end or ending within a day of the data end
  ("open_stay": Synthea leaves some encounters open until the simulation end);
* anchors whose patient died at or before the prediction time ("died_before_prediction");
* for code outcomes with ``exclude_prior``: the code already occurred before the prediction time;
* censored anchors: negative label but the window reaches past the data end ("censored").
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import polars as pl
import yaml

from ..config import ConfigError, from_dict
from .config import check_task_name, check_token
from .errors import DataError

US_PER_HOUR = 3600 * 1_000_000


@dataclass
class AnchorSpec:
    kind: Literal["encounter_start", "encounter_end"] = "encounter_end"
    encounter_classes: list[str] = field(default_factory=lambda: ["IMP"])
    # the anchor counts only if one of these codes (prefix match) occurred at or before the stay's end
    requires_codes: list[str] = field(default_factory=list)
    select: Literal["all", "first", "last"] = "all"
    offset_hours: float = 0.0  # prediction time = anchor time + offset
    min_stay_hours: float = 0.0  # drop stays shorter than this (LOS from the first 24 h: 24)


@dataclass
class OutcomeSpec:
    kind: Literal["death", "encounter_start", "code", "stay_longer_than"] = "death"
    window_days: float = 30.0
    encounter_classes: list[str] = field(default_factory=lambda: ["IMP"])
    codes: list[str] = field(default_factory=list)
    stay_days: float = 7.0
    exclude_prior: bool = True


@dataclass
class TaskConfig:
    """A task. ``kind``: "binary" labels say whether the outcome happens within the window (anchors whose
    window reaches past the data are excluded as censored); "time_to_event" labels also carry the days from the
    prediction time to the outcome, or to censoring, with the window as the horizon (see :func:`compute_labels`)."""

    name: str = ""
    token: str = ""  # task token for multitask prompted finetuning, e.g. "[MOR]"
    description: str = ""
    kind: Literal["binary", "time_to_event"] = "binary"
    anchor: AnchorSpec = field(default_factory=AnchorSpec)
    outcome: OutcomeSpec = field(default_factory=OutcomeSpec)

    def validate(self) -> None:
        """The name becomes a folder (labels/<name>/), so it must be a safe path segment (an empty name is
        reported by :func:`load_tasks`); the token must be one word and no special token."""
        if self.name:
            check_task_name(self.name, "name")
        if self.token:
            check_token(self.token, "token")
        if self.kind == "time_to_event" and self.outcome.kind == "stay_longer_than":
            raise ConfigError(
                "kind: time_to_event needs an outcome event (death, encounter_start or code), not a stay length"
            )


def load_tasks(refs: list[str]) -> list[TaskConfig]:
    """Task definitions from YAML files or shipped config names (``ehrmamba``, ``heart_failure``, ``demo``).

    A file holds ``tasks: [ {name, token, anchor, outcome}, ... ]``. Names must be safe path segments
    (:func:`.config.check_task_name`): a bad one is a ConfigError naming the file, before anything is written.
    """
    tasks: list[TaskConfig] = []
    for ref in refs:
        path = Path(ref)
        if path.suffix in (".yaml", ".yml") and path.exists():
            text = path.read_text()
        else:
            shipped = resources.files("ehrfm.data_shards.task_configs") / f"{ref}.yaml"
            if not shipped.is_file():
                raise DataError(f"task config {ref!r}: no such file and no shipped config of that name")
            text = shipped.read_text()
        data = yaml.safe_load(text) or {}
        for i, item in enumerate(data.get("tasks") or ()):
            task = from_dict(TaskConfig, item, prefix=f"{ref}:tasks[{i}].")
            if not task.name:
                raise DataError(f"task config {ref!r}: tasks[{i}] has no name")
            same_name = [t for t in tasks if t.name == task.name]
            if same_name and same_name[0] != task:
                raise DataError(f"task {task.name!r} is defined twice with different definitions ({ref!r})")
            if not same_name:
                tasks.append(task)
    return tasks


def external_task_names(paths: list[str], tasks: list[TaskConfig]) -> list[str]:
    """Task names of external label files (their file stems), checked like task names and against the
    configured tasks: ConfigError naming the file before anything is written."""
    taken = {t.name for t in tasks}
    names = []
    for i, path in enumerate(paths):
        name = Path(path).stem
        check_task_name(name, f"external_labels[{i}]", source=str(path))
        if name in taken:
            raise ConfigError(
                f"external_labels[{i}]: task name {name!r} (the file name of {path}) is already used by another task"
            )
        taken.add(name)
        names.append(name)
    return names


def encounter_table(events: pl.DataFrame) -> pl.DataFrame:
    """Encounters from ENCOUNTER/<class> and ENCOUNTER_END/<class> events: subject_id, encounter_id, class,
    start, end (end null when the encounter was never closed)."""
    enc = events.filter(pl.col("encounter_id").is_not_null() & pl.col("code").str.starts_with("ENCOUNTER"))
    starts = (
        enc.filter(pl.col("code").str.starts_with("ENCOUNTER/"))
        .group_by("subject_id", "encounter_id")
        .agg(klass=pl.col("code").first().str.split("/").list.get(1), start=pl.col("time").min())
    )
    ends = (
        enc.filter(pl.col("code").str.starts_with("ENCOUNTER_END/"))
        .group_by("subject_id", "encounter_id")
        .agg(end=pl.col("time").max())
    )
    return starts.join(ends, on=["subject_id", "encounter_id"], how="left")


def _code_match(codes: list[str]) -> pl.Expr:
    expr = pl.lit(False)
    for code in codes:
        expr = expr | pl.col("code").str.starts_with(code)
    return expr


@dataclasses.dataclass
class TaskTally:
    anchors: int = 0
    labels: int = 0
    positives: int = 0
    excluded: Counter = dataclasses.field(default_factory=Counter)

    def merge(self, other: TaskTally) -> None:
        self.anchors += other.anchors
        self.labels += other.labels
        self.positives += other.positives
        self.excluded.update(other.excluded)

    def to_dict(self) -> dict:
        return {
            "anchors": self.anchors,
            "labels": self.labels,
            "positives": self.positives,
            "excluded": dict(self.excluded),
        }


def _exclude(frame: pl.DataFrame, keep: pl.Expr, reason: str, tally: TaskTally) -> pl.DataFrame:
    kept = frame.filter(keep)
    if kept.height < frame.height:
        tally.excluded[reason] += frame.height - kept.height
    return kept


def compute_labels(events: pl.DataFrame, task: TaskConfig, data_end, tally: TaskTally) -> pl.DataFrame:
    """Labels of one task for the (whole) patients in ``events`` (cleaned, with a ``death`` column).

    Returns subject_id, prediction_time (datetime[us]), boolean_value.
    """
    empty = pl.DataFrame(
        schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}
    )
    if "encounter_id" not in events.columns or events["encounter_id"].null_count() == events.height:
        return empty
    a, o = task.anchor, task.outcome
    stays = encounter_table(events).filter(pl.col("klass").is_in(a.encounter_classes))
    tally.anchors += stays.height
    open_end = pl.lit(data_end) - pl.duration(days=1)
    stays = _exclude(stays, pl.col("end").is_not_null() & (pl.col("end") < open_end), "open_stay", tally)
    stays = _exclude(stays, pl.col("end") >= pl.col("start"), "negative_stay", tally)
    stays = _exclude(
        stays,
        (pl.col("end") - pl.col("start")) >= pl.duration(microseconds=int(a.min_stay_hours * US_PER_HOUR)),
        "shorter_than_min_stay",
        tally,
    )
    if a.requires_codes:
        first_code = (
            events.filter(_code_match(a.requires_codes)).group_by("subject_id").agg(code_time=pl.col("time").min())
        )
        stays = stays.join(first_code, on="subject_id", how="left")
        stays = _exclude(
            stays, pl.col("code_time").is_not_null() & (pl.col("code_time") <= pl.col("end")), "no_required_code", tally
        )
    anchor_time = pl.col("start") if a.kind == "encounter_start" else pl.col("end")
    stays = stays.with_columns(
        prediction_time=anchor_time + pl.duration(microseconds=int(a.offset_hours * US_PER_HOUR))
    )
    if a.select != "all" and stays.height:
        stays = stays.sort("subject_id", "prediction_time", "encounter_id")
        stays = stays.group_by("subject_id", maintain_order=True).agg(
            pl.all().first() if a.select == "first" else pl.all().last()
        )
    death = events.group_by("subject_id").agg(pl.col("death").first())
    stays = stays.join(death, on="subject_id", how="left")
    stays = _exclude(
        stays,
        pl.col("death").is_null() | (pl.col("death") > pl.col("prediction_time")),
        "died_before_prediction",
        tally,
    )
    window_end = pl.col("prediction_time") + pl.duration(microseconds=int(o.window_days * 24 * US_PER_HOUR))
    if o.kind == "stay_longer_than":
        labeled = stays.with_columns(
            boolean_value=(pl.col("end") - pl.col("start"))
            > pl.duration(microseconds=int(o.stay_days * 24 * US_PER_HOUR))
        )
    else:
        if o.kind == "death":
            hit = stays.with_columns(hit_time=pl.col("death"))
        elif o.kind == "encounter_start":
            others = (
                encounter_table(events)
                .filter(pl.col("klass").is_in(o.encounter_classes))
                .select("subject_id", pl.col("encounter_id").alias("other_id"), pl.col("start").alias("other_start"))
            )
            pairs = stays.join(others, on="subject_id", how="left").filter(
                (pl.col("other_id") != pl.col("encounter_id")) & (pl.col("other_start") > pl.col("prediction_time"))
            )
            first_after = pairs.group_by("subject_id", "encounter_id").agg(hit_time=pl.col("other_start").min())
            hit = stays.join(first_after, on=["subject_id", "encounter_id"], how="left")
        else:  # code: the first occurrence at or after the prediction time (inputs stop strictly before it)
            code_times = events.filter(_code_match(o.codes)).select("subject_id", pl.col("time").alias("code_time"))
            if o.exclude_prior:
                first_code = code_times.group_by("subject_id").agg(first_code=pl.col("code_time").min())
                stays = stays.join(first_code, on="subject_id", how="left")
                stays = _exclude(
                    stays,
                    pl.col("first_code").is_null() | (pl.col("first_code") >= pl.col("prediction_time")),
                    "outcome_before_prediction",
                    tally,
                )
            after = stays.join(code_times, on="subject_id").filter(pl.col("code_time") >= pl.col("prediction_time"))
            first_after = after.group_by("subject_id", "encounter_id").agg(hit_time=pl.col("code_time").min())
            hit = stays.join(first_after, on=["subject_id", "encounter_id"], how="left")
        if task.kind == "time_to_event":
            labeled = _time_to_event(hit, events, o.kind, window_end, data_end, tally)
        else:
            labeled = hit.with_columns(
                boolean_value=pl.col("hit_time").is_not_null() & (pl.col("hit_time") <= window_end)
            )
            labeled = _exclude(labeled, pl.col("boolean_value") | (window_end <= pl.lit(data_end)), "censored", tally)
    columns = ["subject_id", pl.col("prediction_time").cast(pl.Datetime("us")), "boolean_value"]
    if task.kind == "time_to_event":
        columns.append("time_to_event_days")
    out = labeled.select(columns).sort("subject_id", "prediction_time")
    tally.labels += out.height
    tally.positives += int(out["boolean_value"].sum() or 0)
    return out


def _time_to_event(
    hit: pl.DataFrame, events: pl.DataFrame, outcome_kind: str, window_end: pl.Expr, data_end, tally: TaskTally
) -> pl.DataFrame:
    """Time-to-event labels from anchors with their first outcome time (``hit_time``, null if none).

    Follow-up ends at the earliest of: the horizon (prediction time + window), the patient's last recorded
    event, the data end, and -- for outcomes other than death -- death. ``boolean_value`` is True when the
    outcome happens within follow-up; ``time_to_event_days`` counts the days from the prediction time to the
    outcome, else to the end of follow-up. Anchors without follow-up (ending at the prediction time, no event)
    are excluded as "no_follow_up"."""
    last_seen = events.filter(pl.col("time").is_not_null()).group_by("subject_id").agg(last_seen=pl.col("time").max())
    hit = hit.join(last_seen, on="subject_id", how="left")
    ends = [window_end, pl.col("last_seen"), pl.lit(data_end)]
    if outcome_kind != "death":
        ends.append(pl.col("death"))
    follow_up_end = pl.min_horizontal(ends)
    event = pl.col("hit_time").is_not_null() & (pl.col("hit_time") <= follow_up_end)
    until = pl.when(event).then(pl.col("hit_time")).otherwise(follow_up_end)
    days = (until - pl.col("prediction_time")).dt.total_microseconds().cast(pl.Float64) / (24 * US_PER_HOUR)
    labeled = hit.with_columns(boolean_value=event, time_to_event_days=days)
    return _exclude(labeled, pl.col("boolean_value") | (pl.col("time_to_event_days") > 0), "no_follow_up", tally)


def read_external_labels(path: Path) -> pl.DataFrame:
    """Labels in the MEDS label schema (e.g. from ACES): subject_id, prediction_time, boolean_value."""
    import meds
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a readable parquet label file ({err})") from None
    try:
        meds.LabelSchema.validate(table.schema)
    except Exception as err:  # noqa: BLE001
        missing = [c for c in ("subject_id", "prediction_time") if c not in table.schema.names]
        raise DataError(f"{path}: not in the MEDS label schema: {missing or err}") from None
    if "boolean_value" not in table.schema.names:
        raise DataError(f"{path}: external labels need a boolean_value column (binary tasks)")
    frame = pl.from_arrow(table).select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("prediction_time").cast(pl.Datetime("us")),
        pl.col("boolean_value").cast(pl.Boolean),
    )
    nulls = frame.filter(pl.any_horizontal(pl.all().is_null()))
    if nulls.height:
        raise DataError(f"{path}: {nulls.height} label row(s) with nulls, e.g. subject_id {nulls['subject_id'][0]}")
    return frame

"""Cleaned events -> visits -> one token sequence per patient (the CEHR-BERT / EhrMamba layout).

    [CLS] <static codes> [VS] e11 e12 ... [S2D] [VE] [REG] [W2] [VS] e21 ... [S1D] [VE] [REG] [M3] [VS] ...

* Visits: with an encounter column each encounter is a visit; rows without one (and MEDS data without the
  column) are grouped into visits of consecutive events less than ``visits.gap_hours`` apart.
* Visit start = first event, visit end = last event (incl. the encounter's end); visits ordered by start.
* Interval token before every visit but the first, from the gap between the previous visit's end and this
  start: < 28 days -> [W<weeks>] (0-3), up to 12 months -> [M<months>] (30-day months, at least 1), else [LT].
* Stay-length token before every [VE] (``visits.stay_tokens``, an ehrfm addition; off = the CEHR-BERT layout):
  the visit's end minus start, [S<k>D] for at most k days (1-7, 14, 30), [SLT] beyond (``schema.STAY_TOKENS``).
* Within a visit events are ordered by (time, token). Static codes (null time) follow [CLS].
* Special and task tokens appear only where this layout puts them: input codes spelled like one are escaped
  by cleaning (``[PAD]`` -> ``CODE//[PAD]``, :mod:`.cleaning`), and a code row that still carries a reserved
  token string maps to [UNK].

Per token streams (see :mod:`ehrfm.data_shards.schema`): type, age (years), time (weeks since 1970),
visit segment (1/2 alternating; 0 for [CLS] and statics), visit order (1-based; 0 for [CLS] and statics),
and the event time in epoch seconds used to cut inputs at a prediction time. Token times: [CLS] and static
codes take the first event time, an interval token and [VS] the visit start, the stay token, [VE] and [REG] the
visit end (so a stay's length is never visible before the stay ends).
"""

from __future__ import annotations

import polars as pl

from . import schema
from .config import HistoryConfig, VisitConfig, VocabConfig
from .schema import DAYS_PER_YEAR, SECONDS_PER_WEEK, SECONDS_PER_YEAR, SPECIAL_TYPES, US_PER_DAY, TokenType
from .vocab import (
    NON_TOKEN_CODES,
    NON_TOKEN_PREFIXES,
    TYPE_IDS,
    Vocabulary,
    bin_tokens,
    infer_event_type,
    normalize_codes,
)

LOOKBACK_DAYS = {"1y": DAYS_PER_YEAR, "3y": 3 * DAYS_PER_YEAR}
# history.lookback values that cut every visit of a kind instead of the record (HistoryConfig): name -> (the
# encounter classes of the visits kept, as in ENCOUNTER/<class>; hours kept from each visit's start)
STAY_WINDOWS = {"inpatient_24h": (("IMP",), 24.0)}


def is_token_code(code: pl.Expr) -> pl.Expr:
    expr = ~code.is_in(list(NON_TOKEN_CODES))
    for prefix in NON_TOKEN_PREFIXES:
        expr = expr & ~code.str.starts_with(prefix)
    return expr


def prepare_events(frame: pl.DataFrame, vocab_cfg: VocabConfig) -> pl.DataFrame:
    """Normalized codes and event types (from ``event_type`` when present, else inferred from prefixes)."""
    etype = infer_event_type(pl.col("code"))
    if "event_type" in frame.columns:
        etype = pl.coalesce(pl.col("event_type"), etype)
    return frame.with_columns(code=normalize_codes(pl.col("code"), vocab_cfg), event_type=etype)


def assign_visits(frame: pl.DataFrame, cfg: VisitConfig) -> pl.DataFrame:
    """Adds ``visit_key`` to timed rows: the encounter id, else a gap-based group id."""
    timed = frame.filter(pl.col("time").is_not_null())
    enc = cfg.encounter_column
    has_enc = enc in timed.columns and timed[enc].null_count() < timed.height
    no_enc = timed.filter(pl.col(enc).is_null()) if has_enc else timed
    gap = pl.duration(microseconds=int(cfg.gap_hours * 3600 * 1e6))
    new_visit = (pl.col("subject_id") != pl.col("subject_id").shift(1)).fill_null(True) | (
        (pl.col("time") - pl.col("time").shift(1)) > gap
    ).fill_null(True)
    no_enc = no_enc.sort("subject_id", "time").with_columns(visit_key=pl.lit("g") + new_visit.cum_sum().cast(pl.String))
    if not has_enc:
        return no_enc
    with_enc = timed.filter(pl.col(enc).is_not_null()).with_columns(visit_key=pl.lit("e") + pl.col(enc))
    return pl.concat([with_enc, no_enc], how="vertical_relaxed")


def visit_table(events: pl.DataFrame) -> pl.DataFrame:
    """(subject_id, visit_key) -> start, end, visit_order (1..), visit_segment (1/2)."""
    visits = (
        events.group_by("subject_id", "visit_key")
        .agg(start=pl.col("time").min(), end=pl.col("time").max())
        .sort("subject_id", "start", "visit_key")
    )
    return visits.with_columns(
        visit_order=pl.col("start").rank("ordinal").over("subject_id").cast(pl.Int32)
    ).with_columns(visit_segment=(2 - pl.col("visit_order") % 2).cast(pl.Int8))


def apply_lookback(events: pl.DataFrame, visits: pl.DataFrame, lookback: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """003 truncation: keep the latest visit only, or visits ending within 1y/3y of the last visit's end."""
    if lookback == "all":
        return events, visits
    last_end = pl.col("end").max().over("subject_id")
    if lookback == "latest_visit":
        keep = pl.col("visit_order") == pl.col("visit_order").max().over("subject_id")
    else:
        keep = pl.col("end") >= last_end - pl.duration(days=LOOKBACK_DAYS[lookback])
    visits = (
        visits.filter(keep)
        .with_columns(visit_order=pl.col("start").rank("ordinal").over("subject_id").cast(pl.Int32))
        .with_columns(visit_segment=(2 - pl.col("visit_order") % 2).cast(pl.Int8))
    )
    events = events.join(visits.select("subject_id", "visit_key"), on=["subject_id", "visit_key"], how="semi")
    return events, visits


def first_hours_of_stays(
    events: pl.DataFrame, timed: pl.DataFrame, visit_rows: pl.DataFrame, window: str, visit_cfg: VisitConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``history.lookback`` = a :data:`STAY_WINDOWS` name: of ``timed`` (token rows with ``visit_key``) and
    ``visit_rows`` (subject_id, visit_key, time: what visit starts and ends are taken from), only the visits
    holding an ``ENCOUNTER/<class>`` event of the window's classes (found in ``events``, so concept groups do
    not matter), and of those only the rows in [start, start + hours), start = the visit's first row."""
    classes, hours = STAY_WINDOWS[window]
    opened = events.filter(pl.col("time").is_not_null() & pl.col("code").is_in([f"ENCOUNTER/{c}" for c in classes]))
    stays = assign_visits(opened, visit_cfg).select("subject_id", "visit_key").unique()
    keys = ["subject_id", "visit_key"]
    starts = visit_rows.join(stays, on=keys, how="semi").group_by(keys).agg(_start=pl.col("time").min())
    in_window = pl.col("time") < pl.col("_start") + pl.duration(microseconds=int(hours * 3600 * 1e6))
    timed = timed.join(starts, on=keys).filter(in_window).drop("_start")
    visit_rows = visit_rows.join(starts, on=keys).filter(in_window).drop("_start")
    return timed, visit_rows.join(timed.select(keys).unique(), on=keys, how="semi")


def aggregate_numeric(events: pl.DataFrame, days: float) -> pl.DataFrame:
    """003 aggregation: mean of repeated numeric events of one code within a visit and a w-day window."""
    if days <= 0:
        return events
    numeric = events.filter(pl.col("numeric_value").is_not_null())
    other = events.filter(pl.col("numeric_value").is_null())
    window = pl.duration(microseconds=int(days * US_PER_DAY))
    numeric = numeric.with_columns(
        _w=((pl.col("time") - pl.col("time").min().over("subject_id", "visit_key")) / window).floor()
    )
    keys = ["subject_id", "visit_key", "code", "_w"]
    agg = numeric.group_by(keys).agg(
        pl.col("numeric_value").mean().cast(pl.Float32),
        *[pl.col(c).sort_by("time").first() for c in numeric.columns if c not in (*keys, "numeric_value")],
    )
    return pl.concat([other, agg.drop("_w").select(other.columns)], how="vertical_relaxed")


def interval_token(gap: pl.Expr) -> pl.Expr:
    """Interval token name for a gap (a duration) between visits."""
    days = gap.dt.total_microseconds().cast(pl.Float64) / US_PER_DAY
    weeks = (days / 7).floor().clip(0, 3).cast(pl.Int32).cast(pl.String)
    months = (days / 30).floor().clip(1, 12).cast(pl.Int32).cast(pl.String)
    return (
        pl.when(days.is_null())
        .then(pl.lit(None, pl.String))
        .when(days < 28)
        .then("[W" + weeks + "]")
        .when(days < 365)
        .then("[M" + months + "]")
        .otherwise(pl.lit(schema.LONG_TERM))
    )


def stay_length_token(duration: pl.Expr) -> pl.Expr:
    """Stay-length token name for a visit's duration (end - start): the first edge it does not exceed."""
    expr = pl.when(pl.lit(False)).then(pl.lit(None, pl.String))
    for edge, token in zip(schema.STAY_EDGES_DAYS, schema.STAY_TOKENS):
        expr = expr.when(duration <= pl.duration(days=edge)).then(pl.lit(token))
    return expr.otherwise(pl.lit(schema.STAY_TOKENS[-1]))


def build_sequences(
    events: pl.DataFrame,
    vocab: Vocabulary,
    *,
    visit_cfg: VisitConfig,
    history_cfg: HistoryConfig,
) -> pl.DataFrame:
    """Cleaned + prepared events (with ``birth``) -> one row per subject with aligned list columns.

    Output columns: subject_id, input_ids (i32), type_ids (i8), ages (f32, years), times (f32, weeks since
    epoch), visit_segments (i8), visit_orders (i32), event_time_s (i64, epoch seconds), length (i32),
    birth_s (i64 epoch seconds of the birth, null when unknown).
    """
    token_rows = events.filter(is_token_code(pl.col("code")) & pl.col("event_type").is_in(history_cfg.concept_groups))
    static = token_rows.filter(pl.col("time").is_null())
    timed = assign_visits(token_rows.filter(pl.col("time").is_not_null()), visit_cfg)
    # ENCOUNTER_END rows are not tokens but define where a visit ends.
    ends = assign_visits(
        events.filter(pl.col("time").is_not_null() & pl.col("code").str.starts_with("ENCOUNTER_END/")), visit_cfg
    ).select("subject_id", "visit_key", "time")
    visit_rows = pl.concat([timed.select("subject_id", "visit_key", "time"), ends], how="vertical_relaxed").join(
        timed.select("subject_id", "visit_key").unique(), on=["subject_id", "visit_key"], how="semi"
    )
    if history_cfg.lookback in STAY_WINDOWS:
        timed, visit_rows = first_hours_of_stays(events, timed, visit_rows, history_cfg.lookback, visit_cfg)
        visits = visit_table(visit_rows)
    else:
        timed, visits = apply_lookback(timed, visit_table(visit_rows), history_cfg.lookback)
    timed = aggregate_numeric(timed, history_cfg.aggregate_days)
    timed = timed.with_columns(token=bin_tokens(timed, vocab.bin_edges))
    static = static.with_columns(token=pl.col("code"))

    birth = events.group_by("subject_id").agg(pl.col("birth").first())
    first_time = visits.group_by("subject_id").agg(first=pl.col("start").min())
    type_id = pl.col("event_type").replace_strict(TYPE_IDS, default=int(TokenType.OTHER), return_dtype=pl.Int8)

    event_tokens = timed.join(visits, on=["subject_id", "visit_key"]).select(
        "subject_id",
        "visit_order",
        "visit_segment",
        pl.lit(2, pl.Int8).alias("slot"),
        "time",
        "token",
        type_id.alias("type_id"),
    )
    cls_rows = first_time.select(
        "subject_id",
        pl.lit(0, pl.Int32).alias("visit_order"),
        pl.lit(0, pl.Int8).alias("visit_segment"),
        pl.lit(0, pl.Int8).alias("slot"),
        pl.col("first").alias("time"),
        pl.lit(schema.CLS).alias("token"),
        pl.lit(int(TokenType.CLS), pl.Int8).alias("type_id"),
    )
    static_rows = static.join(first_time, on="subject_id").select(
        "subject_id",
        pl.lit(0, pl.Int32).alias("visit_order"),
        pl.lit(0, pl.Int8).alias("visit_segment"),
        pl.lit(1, pl.Int8).alias("slot"),
        pl.col("first").alias("time"),
        "token",
        type_id.alias("type_id"),
    )
    prev_end = pl.col("end").shift(1).over("subject_id", order_by="visit_order")
    specials = visits.with_columns(interval=interval_token(pl.col("start") - prev_end))

    def special(token, slot: int, time_col: str, ttype: TokenType) -> pl.DataFrame:
        token_expr = token if isinstance(token, pl.Expr) else pl.lit(token)
        return specials.select(
            "subject_id",
            "visit_order",
            "visit_segment",
            pl.lit(slot, pl.Int8).alias("slot"),
            pl.col(time_col).alias("time"),
            token_expr.alias("token"),
            pl.lit(int(ttype), pl.Int8).alias("type_id"),
        )

    parts = [
        cls_rows,
        static_rows,
        special(pl.col("interval"), 0, "start", TokenType.INTERVAL).filter(pl.col("token").is_not_null()),
        special(schema.VS, 1, "start", TokenType.VS),
        event_tokens,
        special(schema.VE, 4, "end", TokenType.VE),
        special(schema.REG, 5, "end", TokenType.REG),
    ]
    if visit_cfg.stay_tokens:
        parts.append(special(stay_length_token(pl.col("end") - pl.col("start")), 3, "end", TokenType.STAY))
    rows = pl.concat(parts, how="vertical_relaxed").join(birth, on="subject_id", how="left")
    rows = rows.sort("subject_id", "visit_order", "slot", "time", "token")
    token_ids = pl.col("token").replace_strict(vocab.ids, default=vocab.unk_id, return_dtype=pl.Int32)
    # Only the layout above places special and task tokens: a code row (an event type, not a structural type)
    # whose string is a reserved token maps to [UNK]. Cleaning escapes such codes first (CODE//[PAD]), so this
    # is a safeguard for callers that skip cleaning.
    reserved_ids = sorted(
        {vocab.ids[t] for t in (*schema.SPECIAL_TOKENS, *vocab.task_tokens) if t in vocab.ids} - {vocab.unk_id}
    )
    token_ids = (
        pl.when(~pl.col("type_id").is_in([int(t) for t in SPECIAL_TYPES]) & token_ids.is_in(reserved_ids))
        .then(pl.lit(vocab.unk_id, pl.Int32))
        .otherwise(token_ids)
    )
    # Ages and times from whole seconds, with the operations that decoding a shard row repeats
    # (:func:`.shard_codec.decode`), so that the streams read back equal these bit for bit.
    seconds = pl.col("time").dt.epoch("us") // 1_000_000
    birth_s = pl.col("birth").dt.epoch("us") // 1_000_000
    age_years = ((seconds - birth_s).cast(pl.Float64) / SECONDS_PER_YEAR).fill_null(0.0)
    rows = rows.select(
        "subject_id",
        token_ids.alias("input_ids"),
        pl.col("type_id").alias("type_ids"),
        age_years.cast(pl.Float32).alias("ages"),
        (seconds.cast(pl.Float64) / SECONDS_PER_WEEK).cast(pl.Float32).alias("times"),
        pl.col("visit_segment").cast(pl.Int8).alias("visit_segments"),
        pl.col("visit_order").cast(pl.Int32).alias("visit_orders"),
        seconds.alias("event_time_s"),
    )
    seqs = rows.group_by("subject_id", maintain_order=True).agg(pl.all())
    births = birth.select("subject_id", birth_s.alias("birth_s"))
    return seqs.with_columns(length=pl.col("input_ids").list.len().cast(pl.Int32)).join(
        births, on="subject_id", how="left", maintain_order="left"
    )


def code_counts(events: pl.DataFrame, history_cfg: HistoryConfig) -> pl.DataFrame:
    """Per-code event counts of token-producing events (for the vocabulary), columns code, count."""
    rows = events.filter(is_token_code(pl.col("code")) & pl.col("event_type").is_in(history_cfg.concept_groups))
    return rows.group_by("code").len("count")

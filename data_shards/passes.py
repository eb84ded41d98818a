"""The per-shard work of `ehrfm prepare`'s two passes, as functions of one MEDS shard path.

Each function reads one input shard and returns everything the parent needs from it (counts, samples,
sequences, labels); the parent folds the results in shard order (:meth:`.parallel.ShardPool.map`), which is why
``--jobs N`` writes the same bytes for every N. The shared, read-only inputs of a pass (configuration,
vocabulary, splits, ...) are a :class:`PassContext`, the second argument of every pass function.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl

from . import splits as splits_mod
from .cleaning import Tally, clean_events
from .config import PrepareConfig
from .readers.meds import read_meds_shard
from .tasks import TaskConfig, TaskTally, compute_labels
from .timeline import build_sequences, code_counts, prepare_events
from .vocab import ValueReservoir, Vocabulary

UNLABELLED_SPLITS = ("pretrain", "pretrain_val")


@dataclasses.dataclass
class PassContext:
    """Read-only inputs of a pass. ``vocab``, ``data_end`` and ``tasks`` are set for pass 2 only. With a
    ``cache_dir``, pass 1 leaves each shard's cleaned events there (Arrow IPC, LZ4) for pass 2 to read
    instead of reading and cleaning the shard again."""

    cfg: PrepareConfig
    meds_root: Path
    reserved: tuple[str, ...]
    meds_splits: pl.DataFrame | None
    cache_dir: Path | None = None
    vocab: Vocabulary | None = None
    data_end: dt.datetime | None = None
    tasks: tuple[TaskConfig, ...] = ()


def _with_splits(frame: pl.DataFrame, ctx: PassContext) -> pl.DataFrame:
    assigned = splits_mod.assign_splits(frame.select("subject_id"), ctx.cfg.splits, ctx.meds_splits)
    return frame.join(assigned, on="subject_id", how="left")


def _cleaned(frame: pl.DataFrame, ctx: PassContext, tally: Tally) -> pl.DataFrame:
    return prepare_events(clean_events(frame, ctx.cfg.cleaning, tally, ctx.reserved), ctx.cfg.vocab)


def _cache_file(path: Path, ctx: PassContext) -> Path | None:
    if ctx.cache_dir is None:
        return None
    return ctx.cache_dir / (str(path.relative_to(ctx.meds_root)).replace("/", "__") + ".arrow")


def _time_range_us(events: pl.DataFrame) -> tuple[np.ndarray, int]:
    """(per-subject last event time, longest first-to-last span) in epoch microseconds / microseconds."""
    timed = events.filter(pl.col("time").is_not_null()).group_by("subject_id")
    ranges = timed.agg(first=pl.col("time").min(), last=pl.col("time").max())
    last = ranges["last"].dt.epoch("us").to_numpy().astype(np.int64)
    first = ranges["first"].dt.epoch("us").to_numpy().astype(np.int64)
    return last, int((last - first).max()) if len(last) else 0


@dataclasses.dataclass
class VocabPassResult:
    """Pass 1 of one shard: what the vocabulary, the value bins and the data end are learned from."""

    path: Path
    subjects: list[int]  # distinct subject ids of the shard (the parent checks no subject spans two shards)
    last_times_us: np.ndarray  # (subjects,) int64 last event time per subject
    max_span_s: int  # longest first-to-last event span of a subject, whole seconds rounded up
    code_counts: list[tuple[str, int]]  # pretraining-split token-producing events per code
    values: list[tuple[str, np.ndarray]]  # pretraining-split numeric values per code (ValueReservoir.group)
    tally: Tally  # cleaning counts


def vocab_pass(path: Path, ctx: PassContext) -> VocabPassResult:
    frame = read_meds_shard(path, ctx.meds_root)
    tally = Tally()
    events = _cleaned(frame, ctx, tally)
    cache = _cache_file(path, ctx)
    if cache is not None:
        events.write_ipc(cache, compression="lz4")
    pre = _with_splits(events, ctx).filter(pl.col("split") == "pretrain")
    last_times, span_us = _time_range_us(events)
    return VocabPassResult(
        path=path,
        subjects=frame["subject_id"].unique(maintain_order=True).to_list(),
        last_times_us=last_times,
        max_span_s=-(-span_us // 1_000_000) + 1,  # + 1: whole-second flooring of both ends
        code_counts=list(code_counts(pre, ctx.cfg.history).iter_rows()),
        values=ValueReservoir.group(pre.filter(pl.col("time").is_not_null())),
        tally=tally,
    )


@dataclasses.dataclass
class TokenPassResult:
    """Pass 2 of one shard: its sequences and labels, by split."""

    path: Path
    events_after_data_end: int
    sequences: dict[str, pl.DataFrame]  # split -> sequences sorted by subject_id (build_sequences columns)
    unk_tokens: int
    subject_split: pl.DataFrame  # subject_id, split
    labels: dict[tuple[str, str], pl.DataFrame]  # (task, split) -> MEDS labels
    task_tallies: dict[str, TaskTally]


def split_sequences(events: pl.DataFrame, vocab: Vocabulary, cfg: PrepareConfig) -> pl.DataFrame:
    """Token sequences of a shard. ``history.lookback`` truncates the pretraining splits here (relative to the
    last visit, or stay by stay); labelled splits keep their whole history and are truncated relative to each
    prediction time when cut (``examples.cut_at``): truncating them by the end of the record would leak the
    outcome."""
    if cfg.history.lookback == "all":
        return build_sequences(events.drop("split"), vocab, visit_cfg=cfg.visits, history_cfg=cfg.history)
    full = dataclasses.replace(cfg.history, lookback="all")
    parts = []
    for unlabelled, history in ((True, cfg.history), (False, full)):
        part = events.filter(pl.col("split").is_in(UNLABELLED_SPLITS) == unlabelled)
        if part.height:
            parts.append(build_sequences(part.drop("split"), vocab, visit_cfg=cfg.visits, history_cfg=history))
    return pl.concat(parts, how="vertical_relaxed")


def token_pass(path: Path, ctx: PassContext) -> TokenPassResult:
    assert ctx.vocab is not None and ctx.data_end is not None
    cache = _cache_file(path, ctx)
    if cache is not None and cache.exists():
        events = pl.read_ipc(cache)
        cache.unlink()
    else:
        events = _cleaned(read_meds_shard(path, ctx.meds_root), ctx, Tally())
    after_end = events.filter(pl.col("time") > ctx.data_end).height
    events = _with_splits(events, ctx)
    seqs = split_sequences(events, ctx.vocab, ctx.cfg)
    subject_split = events.select("subject_id", "split").unique()
    seqs = seqs.join(subject_split, on="subject_id", how="left")
    unk_tokens = int(seqs["input_ids"].explode().eq(ctx.vocab.unk_id).sum())
    sequences = {split: part.sort("subject_id") for (split,), part in seqs.partition_by("split", as_dict=True).items()}
    labels: dict[tuple[str, str], pl.DataFrame] = {}
    tallies = {}
    for task in ctx.tasks:
        tallies[task.name] = TaskTally()
        task_labels = compute_labels(events, task, ctx.data_end, tallies[task.name])
        task_labels = task_labels.join(subject_split, on="subject_id", how="left")
        for (split,), part in task_labels.partition_by("split", as_dict=True).items():
            labels[(task.name, split)] = part.drop("split")
    return TokenPassResult(
        path=path,
        events_after_data_end=after_end,
        sequences=sequences,
        unk_tokens=unk_tokens,
        subject_split=subject_split,
        labels=labels,
        task_tallies=tallies,
    )

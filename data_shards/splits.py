"""Patient-level splits: pretrain / finetune / test, each with a validation slice.

A subject's split is a pure function of (seed, subject_id): a 64-bit hash mapped to [0, 1). This is
deterministic, needs no global pass over patients, and no patient can land in two splits.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .config import SplitConfig
from .errors import DataError

SPLITS = ("pretrain", "pretrain_val", "finetune", "finetune_val", "test")
MEDS_TO_EHRFM = {"train": "train", "tuning": "val", "held_out": "test"}


def unit_hash(subject_ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Uniform [0, 1) per subject id: splitmix64 of (id, seed, salt). Our own hash, so splits never change
    with a library upgrade (polars' ``hash`` is not stable across versions)."""
    with np.errstate(over="ignore"):
        z = subject_ids.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9) % 2**64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def assign_splits(subjects: pl.DataFrame, cfg: SplitConfig, meds_splits: pl.DataFrame | None = None) -> pl.DataFrame:
    """``subjects`` (a ``subject_id`` column) -> same with a ``split`` column (one of SPLITS)."""
    total = cfg.pretrain + cfg.finetune + cfg.test
    if abs(total - 1.0) > 1e-6 or min(cfg.pretrain, cfg.finetune, cfg.test) < 0:
        raise DataError(f"splits: pretrain/finetune/test fractions must be >= 0 and sum to 1, got {total}")
    u, v = pl.col("_u"), pl.col("_v")
    is_val = v < cfg.val_fraction
    pre_end, fin_end = cfg.pretrain, cfg.pretrain + cfg.finetune
    by_hash = (
        pl.when(u < pre_end)
        .then(pl.when(is_val).then(pl.lit("pretrain_val")).otherwise(pl.lit("pretrain")))
        .when(u < fin_end)
        .then(pl.when(is_val).then(pl.lit("finetune_val")).otherwise(pl.lit("finetune")))
        .otherwise(pl.lit("test"))
    )
    frame = subjects.select("subject_id").unique(maintain_order=True)
    ids = frame["subject_id"].to_numpy()
    frame = frame.with_columns(_u=unit_hash(ids, cfg.seed, 1), _v=unit_hash(ids, cfg.seed, 2))
    if meds_splits is None or not cfg.respect_meds_splits:
        return frame.with_columns(split=by_hash).drop("_u", "_v")
    # train -> pretrain / finetune in the ratio of their fractions; tuning -> the validation slices.
    ratio = cfg.pretrain / max(cfg.pretrain + cfg.finetune, 1e-12)
    frame = frame.join(meds_splits, on="subject_id", how="left")
    given = pl.col("split").replace_strict(MEDS_TO_EHRFM, default=None, return_dtype=pl.String)
    from_meds = (
        pl.when(given == "test")
        .then(pl.lit("test"))
        .when(given == "train")
        .then(pl.when(u < ratio).then(pl.lit("pretrain")).otherwise(pl.lit("finetune")))
        .when(given == "val")
        .then(pl.when(u < ratio).then(pl.lit("pretrain_val")).otherwise(pl.lit("finetune_val")))
    )
    return frame.with_columns(split=pl.coalesce(from_meds, by_hash)).select("subject_id", "split")

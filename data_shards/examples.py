"""Task examples: a patient's sequence cut at a label's prediction time (no leakage), plus the label.

Only tokens whose event time is strictly before the prediction time are kept; then, when the data was
prepared with ``history.lookback`` (003 truncation), only the visits within that window *of the prediction
time* (the static prefix stays; the per-stay windows of ``timeline.STAY_WINDOWS`` cut pretraining
documents only, so examples keep their whole history); then the most recent ``context_length`` tokens (003's
right-sided cutoff). The lookback must be applied here and not at prepare time for labelled splits: relative
to the end of the record it would leak the outcome (a record that ends early, e.g. at death, keeps history a
survivor loses).
This is the single place where finetuning inputs are cut, and the property test in
tests/data_shards/test_leakage.py holds it to that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .errors import DataError
from .schema import SECONDS_PER_DAY
from .shards import read_manifest
from .stream import ShardReader
from .timeline import LOOKBACK_DAYS, STAY_WINDOWS

LOOKBACK_SECONDS = {name: days * SECONDS_PER_DAY for name, days in LOOKBACK_DAYS.items()}


def _lookback_mask(times: np.ndarray, orders: np.ndarray, prediction_time_s: int, lookback: str) -> np.ndarray:
    """Tokens kept by the 003 truncation relative to the prediction time: the static prefix (visit order 0)
    and the latest visit, or the visits whose last token lies within 1y/3y before the prediction time."""
    in_visit = orders > 0
    if not in_visit.any():
        return np.ones_like(in_visit)
    if lookback == "latest_visit":
        return ~in_visit | (orders == orders[in_visit].max())
    visit_ids, inverse = np.unique(orders, return_inverse=True)
    visit_end = np.full(len(visit_ids), np.iinfo(np.int64).min)
    np.maximum.at(visit_end, inverse, times.astype(np.int64))
    return ~in_visit | (visit_end[inverse] >= prediction_time_s - LOOKBACK_SECONDS[lookback])


def cut_at(
    sample: dict[str, np.ndarray], prediction_time_s: int, context_length: int | None = None, lookback: str = "all"
) -> dict:
    """Tokens of ``sample`` with ``event_time_s < prediction_time_s``, then the ``lookback`` window of the
    prediction time (visit orders renumbered from 1 as in pretraining), then the last ``context_length``."""
    keep = sample["event_time_s"] < prediction_time_s
    out = {k: (v[keep] if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in sample.items()}
    if lookback not in ("all", *STAY_WINDOWS) and len(out["input_ids"]):
        keep = _lookback_mask(out["event_time_s"], out["visit_orders"], prediction_time_s, lookback)
        out = {k: (v[keep] if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in out.items()}
        orders = out["visit_orders"]
        if (orders > 0).any():
            shift = orders[orders > 0].min() - 1
            new = np.where(orders > 0, orders - shift, 0).astype(orders.dtype)
            out["visit_orders"] = new
            segments = out["visit_segments"]
            out["visit_segments"] = np.where(new > 0, 2 - new % 2, segments).astype(segments.dtype)
    if context_length is not None and len(out["input_ids"]) > context_length:
        out = {k: (v[-context_length:] if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in out.items()}
    return out


class TaskExamples:
    """Map-style dataset of (cut sequence, label) for one task and split of a prepared folder."""

    def __init__(self, data_dir: Path, task: str, split: str, context_length: int | None = None) -> None:
        manifest = read_manifest(data_dir)
        if task not in manifest["tasks"]:
            raise DataError(f"{data_dir}: unknown task {task!r}; prepared tasks: {sorted(manifest['tasks'])}")
        self.labels = pl.read_parquet(Path(data_dir) / "labels" / task / f"{split}.parquet")
        self.lookback = _prepared_lookback(Path(data_dir))
        self.reader = ShardReader(data_dir, manifest["shards"][split])
        self.context_length = context_length
        row_of = {int(sid): row for row, sid in enumerate(self.reader.subject_ids())}
        self._row_of = row_of
        missing = [s for s in self.labels["subject_id"].to_list() if s not in row_of]
        if missing:
            raise DataError(f"labels of task {task!r} ({split}) name subjects without a sequence, e.g. {missing[0]}")
        self._pred_s = (self.labels["prediction_time"].dt.epoch("us") // 1_000_000).to_numpy()

    def __len__(self) -> int:
        return self.labels.height

    def prediction_time_s(self, i: int) -> int:
        """Prediction time of label row ``i`` in epoch seconds (inputs are the tokens strictly before it)."""
        return int(self._pred_s[i])

    def __getitem__(self, i: int) -> tuple[dict, bool]:
        sid = int(self.labels["subject_id"][i])
        sample = self.reader.get(self._row_of[sid])
        return (
            cut_at(sample, int(self._pred_s[i]), self.context_length, self.lookback),
            bool(self.labels["boolean_value"][i]),
        )


def _prepared_lookback(data_dir: Path) -> str:
    """``history.lookback`` of the folder's resolved prepare config (``all`` when it has none)."""
    from ..config import load_config
    from .config import PrepareConfig

    path = data_dir / "config.yaml"
    return load_config(PrepareConfig, path).history.lookback if path.exists() else "all"

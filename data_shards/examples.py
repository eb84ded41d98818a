"""Task examples: a patient's sequence cut at a label's prediction time (no leakage), plus the label.

Only tokens whose event time is strictly before the prediction time are kept; then the most recent
``context_length`` tokens (003's right-sided cutoff). This is the single place where finetuning inputs
are cut, and the property test in tests/data_shards/test_leakage.py holds it to that.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .errors import DataError
from .shards import read_manifest
from .stream import ShardReader


def cut_at(sample: dict[str, np.ndarray], prediction_time_s: int, context_length: int | None = None) -> dict:
    """Tokens of ``sample`` with ``event_time_s < prediction_time_s`` (then the last ``context_length``)."""
    keep = sample["event_time_s"] < prediction_time_s
    out = {k: (v[keep] if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in sample.items()}
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
        self.reader = ShardReader(data_dir, manifest["shards"][split])
        self.context_length = context_length
        row_of = {}
        for shard_idx, shard in enumerate(manifest["shards"][split]):
            for local in range(shard["rows"]):
                row_of[int(self.reader._load(shard_idx)["subject_id"][local])] = int(self.reader.starts[shard_idx]) + local
        self._row_of = row_of
        missing = [s for s in self.labels["subject_id"].to_list() if s not in row_of]
        if missing:
            raise DataError(f"labels of task {task!r} ({split}) name subjects without a sequence, e.g. {missing[0]}")
        self._pred_s = (self.labels["prediction_time"].dt.epoch("us") // 1_000_000).to_numpy()

    def __len__(self) -> int:
        return self.labels.height

    def __getitem__(self, i: int) -> tuple[dict, bool]:
        sid = int(self.labels["subject_id"][i])
        sample = self.reader.get(self._row_of[sid])
        return cut_at(sample, int(self._pred_s[i]), self.context_length), bool(self.labels["boolean_value"][i])

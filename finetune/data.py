"""Finetuning inputs: checks of model/data compatibility, task datasets and batches (per-task and MPF).

Every example is one label row (``subject_id, prediction_time, boolean_value``) of one task, its patient
sequence cut strictly before the prediction time by :class:`ehrfm.data_shards.examples.TaskExamples`.

MPF prompt (001 3.3): the first and last tokens, normally [CLS] and [REG], become the task token. After the
cut a sequence usually ends *mid-visit*: [VE] and [REG] carry the visit end time, so a prediction at
discharge or 24 h after admission never sees them. Our rule:

* last token is [REG] -> it is replaced (the paper's case);
* otherwise the task token is *appended* after the last real event (no clinical event before the
  prediction time is dropped); its streams (age, time, visit segment/order, event time) copy the last
  token's, type TASK. The embedding layer zeroes time/age/visit embeddings of special types anyway.
* then the sequence is cut to the most recent ``context_length`` tokens, and the first token -- [CLS], or
  after a left cut the oldest kept event -- is replaced by the task token.

The classifier reads the token of the backbone's ``default_pooling``: the last task token (last non-pad
position) for causal backbones and XLNet, the first one for BERT and ModernBERT. Task tokens come from the data manifest (``tasks.<name>.token``) and the vocabulary; a new task
needs only a task config with a token when the data is prepared.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ehrfm.data_shards.collate import assemble_rows
from ehrfm.data_shards.examples import TaskExamples
from ehrfm.data_shards.schema import PAD_ID, TokenType
from ehrfm.data_shards.vocab import Vocabulary
from ehrfm.errors import EhrfmError

log = logging.getLogger("ehrfm.finetune")

EXPORT_FILE = "ehrfm_export.json"
TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT = "finetune", "finetune_val", "test"
MODEL_KEYS = (
    "input_ids",
    "type_ids",
    "ages",
    "times",
    "visit_segments",
    "visit_orders",
    "position_ids",
    "attention_mask",
)


class FinetuneInputError(EhrfmError, ValueError):
    """A model folder, data folder or task selection that cannot be finetuned / evaluated; names the file.
    ``task`` names the task at fault when one task alone is (callers such as `ehrfm ablate` drop it)."""

    def __init__(self, message: str, *, task: str | None = None):
        super().__init__(message)
        self.task = task


def read_export_metadata(model_dir: Path) -> dict:
    """``ehrfm_export.json`` of an exported model folder, checked for the fields finetuning needs."""
    model_dir = Path(model_dir)
    path = model_dir / EXPORT_FILE
    if not model_dir.is_dir():
        raise FinetuneInputError(f"{model_dir}: model folder does not exist")
    if not path.exists():
        raise FinetuneInputError(
            f"{model_dir}: not an ehrfm export (no {EXPORT_FILE}); export a pretraining run with `ehrfm export`"
        )
    if not (model_dir / "config.json").exists():
        raise FinetuneInputError(f"{model_dir}: no config.json (HF model config) next to {EXPORT_FILE}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FinetuneInputError(f"{path}: not valid JSON ({err})") from None
    for key in ("architecture", "vocab_fingerprint"):
        if not meta.get(key):
            raise FinetuneInputError(f"{path}: field {key!r} is missing or empty")
    return meta


def check_vocabulary(model_fingerprint: str, model_source: Path, data_dir: Path, manifest: dict) -> None:
    """The model's vocabulary must be the data's: same token -> id mapping (fingerprint)."""
    data_fp = manifest.get("vocab_fingerprint")
    if model_fingerprint != data_fp:
        raise FinetuneInputError(
            f"vocabulary mismatch: {model_source} has vocab_fingerprint {model_fingerprint!r} but "
            f"{Path(data_dir) / 'manifest.json'} has {data_fp!r}; prepare the data with the model's tokenizer"
        )


def resolve_tasks(manifest: dict, data_dir: Path, requested: list[str]) -> list[str]:
    """Requested task names (all prepared tasks if empty), each known to the manifest."""
    known = list(manifest.get("tasks", {}))
    tasks = list(requested) or known
    if not tasks:
        raise FinetuneInputError(f"{Path(data_dir) / 'manifest.json'}: the data has no tasks; prepare it with tasks")
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise FinetuneInputError(f"unknown task(s) {unknown}: {Path(data_dir) / 'manifest.json'} has tasks {known}")
    return tasks


def check_label_counts(
    data_dir: Path, tasks: list[str], splits: tuple[str, ...]
) -> dict[tuple[str, str], tuple[int, int]]:
    """(rows, positives) per (task, split) from the label files; zero positives or negatives is an error."""
    counts = {}
    for task in tasks:
        for split in splits:
            path = Path(data_dir) / "labels" / task / f"{split}.parquet"
            if not path.exists():
                raise FinetuneInputError(f"{path}: label file missing")
            y = pl.read_parquet(path, columns=["boolean_value"])["boolean_value"]
            rows, pos = y.len(), int(y.sum() or 0)
            if pos == 0:
                raise FinetuneInputError(
                    f"task {task!r}: zero positive labels in split {split!r} ({path}, {rows} rows)", task=task
                )
            if pos == rows:
                raise FinetuneInputError(
                    f"task {task!r}: zero negative labels in split {split!r} ({path}, {rows} rows)", task=task
                )
            counts[(task, split)] = (rows, pos)
    return counts


def task_token_ids(data_dir: Path, manifest: dict, tasks: list[str]) -> dict[str, int]:
    """Vocabulary id of each task's token (``manifest.tasks.<name>.token``); errors name the task."""
    vocab = Vocabulary.load(Path(data_dir) / "tokenizer")
    ids = {}
    for task in tasks:
        token = manifest["tasks"][task].get("token")
        if not token:
            raise FinetuneInputError(
                f"task {task!r} has no task token in {Path(data_dir) / 'manifest.json'}; MPF needs one"
            )
        if token not in vocab.ids:
            raise FinetuneInputError(f"task token {token!r} of task {task!r} is not in {Path(data_dir) / 'tokenizer'}")
        ids[task] = vocab.ids[token]
    return ids


def _empty_sample() -> dict:
    return {
        "input_ids": np.array([PAD_ID], dtype=np.int64),
        "type_ids": np.array([int(TokenType.CLS)], dtype=np.int64),
        "ages": np.zeros(1, np.float32),
        "times": np.zeros(1, np.float32),
        "visit_segments": np.zeros(1, np.int64),
        "visit_orders": np.zeros(1, np.int64),
        "event_time_s": np.zeros(1, np.int64),
    }


def mpf_prompt(sample: dict, token_id: int, context_length: int) -> dict:
    """The MPF form of a cut sequence (see the module docstring). Returns new arrays, length <= context_length."""
    streams = {k: np.asarray(v) for k, v in sample.items() if isinstance(v, np.ndarray) and v.ndim == 1}
    n = len(streams["input_ids"])
    if n == 0:
        streams = _empty_sample()
        streams["input_ids"][0] = token_id
        streams["type_ids"][0] = int(TokenType.TASK)
        return streams
    if int(streams["type_ids"][-1]) == TokenType.REG:
        out = {k: v.copy() for k, v in streams.items()}
    else:
        out = {k: np.concatenate([v, v[-1:]]) for k, v in streams.items()}
    out["input_ids"][-1] = token_id
    out["type_ids"][-1] = int(TokenType.TASK)
    if len(out["input_ids"]) > context_length:
        out = {k: v[-context_length:] for k, v in out.items()}
    out["input_ids"][0] = token_id
    out["type_ids"][0] = int(TokenType.TASK)
    return out


def plain_sample(sample: dict) -> dict:
    """The per-task input: the cut sequence itself (a lone [CLS]-typed pad for an empty history)."""
    streams = {k: v for k, v in sample.items() if isinstance(v, np.ndarray) and v.ndim == 1}
    return streams if len(streams["input_ids"]) else _empty_sample()


@dataclass
class Example:
    task_index: int
    row: int  # row in the task's label file of the split


def sample_subjects(subject_ids: list[np.ndarray], fraction: float, seed: int) -> set[int]:
    """The seeded ``fraction`` of patients (round(fraction * n), at least one) of the union of ``subject_ids``
    (one array per task): the patients a data-fraction run trains on. Finetuning and the count baselines call
    it with the same tasks and seed, so both see the same patients."""
    subjects = np.unique(np.concatenate(subject_ids))
    n_keep = max(1, int(round(fraction * len(subjects))))
    return set(np.random.default_rng(seed).choice(subjects, size=n_keep, replace=False).tolist())


class FinetuneDataset(torch.utils.data.Dataset):
    """Label rows of several tasks of one split; items are (model streams, label, task index, row).

    ``mpf_token_ids`` (task -> id) turns on the MPF prompt. ``train_fraction`` < 1 keeps a seeded random
    subset of *patients* (all label rows of a kept patient stay), the few-shot / data-fraction setting.
    """

    def __init__(
        self,
        data_dir: Path,
        tasks: list[str],
        split: str,
        context_length: int,
        mpf_token_ids: dict[str, int] | None = None,
        train_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.tasks = list(tasks)
        self.split = split
        self.context_length = context_length
        self.mpf_token_ids = mpf_token_ids
        # MPF adds a token: cut one token earlier so the prompt still fits
        cut_length = context_length - 1 if mpf_token_ids else context_length
        self.sources = [TaskExamples(Path(data_dir), t, split, cut_length) for t in self.tasks]
        keep_subjects = None
        if train_fraction < 1.0:
            keep_subjects = sample_subjects(
                [s.labels["subject_id"].to_numpy() for s in self.sources], train_fraction, seed
            )
        self.items: list[Example] = []
        for t, source in enumerate(self.sources):
            sids = source.labels["subject_id"].to_numpy()
            for row in range(len(source)):
                if keep_subjects is None or int(sids[row]) in keep_subjects:
                    self.items.append(Example(t, row))
        self._labels = [s.labels["boolean_value"].to_numpy() for s in self.sources]
        self._times = [
            s.labels["time_to_event_days"].to_numpy().astype(np.float32)
            if "time_to_event_days" in s.labels.columns
            else np.full(len(s), np.nan, dtype=np.float32)
            for s in self.sources
        ]

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray:
        return np.array([self._labels[e.task_index][e.row] for e in self.items], dtype=bool)

    def time_to_event_tasks(self) -> list[str]:
        """Tasks whose labels carry ``time_to_event_days`` (time-to-event tasks)."""
        return [t for t, s in zip(self.tasks, self.sources) if "time_to_event_days" in s.labels.columns]

    def times(self) -> np.ndarray:
        """(N,) days to the event or censoring of every item (NaN for binary tasks)."""
        return np.array([self._times[e.task_index][e.row] for e in self.items], dtype=np.float32)

    def task_indices(self) -> np.ndarray:
        return np.array([e.task_index for e in self.items], dtype=np.int64)

    def label_frame(self) -> pl.DataFrame:
        """subject_id, prediction_time, boolean_value, task of every item, in item order."""
        parts = []
        for t, source in enumerate(self.sources):
            rows = [e.row for e in self.items if e.task_index == t]
            parts.append(
                source.labels[rows].with_columns(
                    task=pl.lit(self.tasks[t]),
                    _item=pl.Series([i for i, e in enumerate(self.items) if e.task_index == t], dtype=pl.Int64),
                )
            )
        return pl.concat(parts, how="diagonal_relaxed").sort("_item").drop("_item")

    def __getitem__(self, i: int) -> tuple[dict, bool, int, float]:
        """(model streams, label, task index, days to event or censoring -- NaN for a binary task)."""
        ex = self.items[i]
        sample, label = self.sources[ex.task_index][ex.row]
        if self.mpf_token_ids is not None:
            doc = mpf_prompt(sample, self.mpf_token_ids[self.tasks[ex.task_index]], self.context_length)
        else:
            doc = plain_sample(sample)
        return doc, label, ex.task_index, float(self._times[ex.task_index][ex.row])


def collate(items: list[tuple[dict, bool, int, float]]) -> dict[str, torch.Tensor]:
    """Right-padded batch: the model streams (B, L) plus ``label`` (B,) float, ``task`` (B,) long and ``time``
    (B,) float days (NaN for binary tasks)."""
    length = max(len(item[0]["input_ids"]) for item in items)
    batch = assemble_rows([[item[0]] for item in items], length)
    out = {k: batch[k] for k in MODEL_KEYS}
    out["label"] = torch.tensor([float(item[1]) for item in items])
    out["task"] = torch.tensor([item[2] for item in items], dtype=torch.long)
    out["time"] = torch.tensor([float(item[3]) for item in items], dtype=torch.float32)
    return out


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The keys the backbones take (no labels / task / document_ids: one document per row)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}

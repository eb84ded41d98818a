"""MPF prompts and batches: the right task token at the first and last position, the right label per row,
mixed-task batches; the per-task input is the cut sequence unchanged."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from ehrfm.data_shards.schema import TokenType
from ehrfm.data_shards.vocab import Vocabulary
from ehrfm.finetune.data import FinetuneDataset, collate, mpf_prompt

TASKS = ["any_visit_90d", "emer_365d"]  # tasks_synthea.yaml

T = TokenType


def _sample(types, ids=None):
    n = len(types)
    return {
        "input_ids": np.asarray(ids if ids is not None else np.arange(10, 10 + n), dtype=np.int64),
        "type_ids": np.asarray(types, dtype=np.int64),
        "ages": np.linspace(60, 61, n).astype(np.float32),
        "times": np.linspace(100, 101, n).astype(np.float32),
        "visit_segments": np.ones(n, np.int64),
        "visit_orders": np.ones(n, np.int64),
        "event_time_s": np.arange(n, dtype=np.int64) * 60,
    }


def test_prompt_replaces_cls_and_reg_when_sequence_ends_at_a_visit_boundary():
    s = _sample([T.CLS, T.VS, T.DX, T.VE, T.REG])
    out = mpf_prompt(s, 7, context_length=16)
    assert out["input_ids"].tolist() == [7, 11, 12, 13, 7]
    assert out["type_ids"].tolist() == [T.TASK, T.VS, T.DX, T.VE, T.TASK]
    assert s["input_ids"].tolist() == [10, 11, 12, 13, 14]  # input not modified in place


def test_prompt_appends_after_a_mid_visit_cut_and_keeps_every_event():
    s = _sample([T.CLS, T.VS, T.DX, T.LAB])
    out = mpf_prompt(s, 7, context_length=16)
    assert out["input_ids"].tolist() == [7, 11, 12, 13, 7]
    assert out["type_ids"][-1] == T.TASK
    # the appended token copies the last token's time, so it never lies after the prediction time
    assert out["event_time_s"][-1] == s["event_time_s"][-1]
    assert out["ages"][-1] == s["ages"][-1]


def test_prompt_respects_context_length_and_marks_the_oldest_kept_token():
    s = _sample([T.CLS, T.VS, T.DX, T.LAB, T.MED, T.DX])
    out = mpf_prompt(s, 7, context_length=4)
    assert len(out["input_ids"]) == 4
    assert out["input_ids"].tolist() == [7, 14, 15, 7]  # [.., LAB(13) overwritten, MED, DX, task]


def test_prompt_of_an_empty_history_is_the_task_token():
    s = _sample([])
    out = mpf_prompt(s, 9, context_length=8)
    assert out["input_ids"].tolist() == [9] and out["type_ids"].tolist() == [T.TASK]


def test_mpf_batches_carry_the_task_token_and_label_of_each_row(ft_data):
    manifest = json.loads((ft_data / "manifest.json").read_text())
    vocab = Vocabulary.load(ft_data / "tokenizer")
    token_ids = {t: vocab.ids[manifest["tasks"][t]["token"]] for t in TASKS}
    assert len(set(token_ids.values())) == 2
    ds = FinetuneDataset(ft_data, TASKS, "finetune", 48, token_ids)
    frame = ds.label_frame()
    for t in TASKS:  # every label row of every task is an item, in label-file order
        expected = pl.read_parquet(ft_data / "labels" / t / "finetune.parquet")
        got = frame.filter(pl.col("task") == t).drop("task")
        assert got.equals(expected)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=32, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)
    )
    mixed = 0
    seen = 0
    for batch in loader:
        lengths = batch["attention_mask"].sum(1)
        last = batch["input_ids"][torch.arange(len(lengths)), lengths - 1]
        first = batch["input_ids"][:, 0]
        want = torch.tensor([token_ids[TASKS[t]] for t in batch["task"].tolist()])
        assert torch.equal(last, want) and torch.equal(first, want)
        assert (batch["type_ids"][torch.arange(len(lengths)), lengths - 1] == T.TASK).all()
        assert batch["input_ids"].shape[1] <= 48
        mixed += int(batch["task"].unique().numel() > 1)
        seen += len(lengths)
    assert seen == len(ds) and mixed > 0
    # labels: item i of the dataset carries row i of the label frame
    for i in range(0, len(ds), 37):
        doc, label, task, _ = ds[i]
        assert label == frame["boolean_value"][i] and TASKS[task] == frame["task"][i]
        assert doc["input_ids"][-1] == token_ids[TASKS[task]]


def test_per_task_items_are_the_cut_sequences(ft_data):
    ds = FinetuneDataset(ft_data, TASKS[:1], "finetune", 48)
    doc, label, task, days = ds[0]
    sample, label_direct = ds.sources[0][0]
    assert label == label_direct and task == 0 and np.isnan(days)  # a binary task has no event time
    np.testing.assert_array_equal(doc["input_ids"], sample["input_ids"])
    pred_s = ds.sources[0]._pred_s[0]
    assert (doc["event_time_s"] < pred_s).all()


@pytest.mark.parametrize("fraction", [0.5])
def test_train_fraction_keeps_whole_patients_reproducibly(ft_data, fraction):
    full = FinetuneDataset(ft_data, TASKS, "finetune", 32)
    a = FinetuneDataset(ft_data, TASKS, "finetune", 32, train_fraction=fraction, seed=3)
    b = FinetuneDataset(ft_data, TASKS, "finetune", 32, train_fraction=fraction, seed=3)
    subjects_full = set(full.label_frame()["subject_id"].to_list())
    subjects_a = set(a.label_frame()["subject_id"].to_list())
    assert a.label_frame().equals(b.label_frame())
    assert subjects_a < subjects_full or len(subjects_full) == 1
    kept = full.label_frame().filter(pl.col("subject_id").is_in(list(subjects_a)))
    assert kept.height == len(a)  # all rows of a kept patient stay

"""Finetuning and prediction run where the model is (issue 14): batches reach the model on its device.

On CPU the device is the host, so the check uses tests/pretrain/device_guard.py's fake device: the collated
batches are marked as host tensors, only ``.to(device)`` clears the mark, and the model must never see a
marked tensor. Before issue 14, finetuning fed the DataLoader's host batches straight into the model (on a
GPU machine everything then ran on the CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "device_guard", Path(__file__).resolve().parents[1] / "pretrain" / "device_guard.py"
)
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)


def test_finetune_and_evaluate_feed_the_model_on_its_device(llama_export, ft_data, tasks, tmp_path, monkeypatch):
    from ehrfm.finetune import train as ft_train
    from ehrfm.finetune.config import FinetuneConfig
    from ehrfm.finetune.evaluate import evaluate
    from ehrfm.finetune.model import FinetuneModel

    collate = ft_train.collate

    def host_collate(rows):
        batch = collate(rows)
        guard._mark(batch, True)  # what a DataLoader hands over: tensors on the host
        return batch

    monkeypatch.setattr(ft_train, "collate", host_collate)
    forward, seen = FinetuneModel.forward, []

    def checked_forward(self, batch):
        seen.append(sorted(k for k, v in batch.items() if guard.is_host(v)))
        return forward(self, batch)

    monkeypatch.setattr(FinetuneModel, "forward", checked_forward)
    cfg = FinetuneConfig(method="per-task", context_length=24, epochs=1, tasks=tasks)
    with guard.HostTensorMode():
        ft_train.finetune(llama_export, ft_data, tmp_path / "ft", cfg)
        n_train = len(seen)
        evaluate(tmp_path / "ft", ft_data, "test", tmp_path / "eval", n_boot=10)
    assert n_train > 0 and len(seen) > n_train
    assert all(not host for host in seen), [host for host in seen if host][:2]

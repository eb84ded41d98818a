"""The fake-device guard itself (tests/pretrain/device_guard.py) must catch what it is there to catch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

_spec = importlib.util.spec_from_file_location("device_guard", Path(__file__).with_name("device_guard.py"))
guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guard)


def test_host_tensors_are_marked_and_followed():
    with guard.HostTensorMode():
        host = torch.tensor([1.0, 2.0])
        derived = host[0:1].clone() * 2
        placed = torch.zeros(2, device="cpu")
        mixed = placed + host  # reads a device tensor: would sit on the device
        moved = torch.ones(3).to("cpu")
    assert guard.is_host(host) and guard.is_host(derived)
    assert not guard.is_host(placed) and not guard.is_host(mixed) and not guard.is_host(moved)


def test_collective_rejects_a_host_tensor(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", guard._checked("all_reduce", dist.all_reduce))
    with guard.HostTensorMode():
        values = torch.tensor([1.0, 0.0], dtype=torch.float64)
        with pytest.raises(guard.HostTensorInCollective, match="all_reduce"):
            dist.all_reduce(values[0:1].clone())

"""Finetuning resumes from its epoch checkpoint: a run killed in its second epoch and started again ends with the
same weights, history and best epoch as an uninterrupted run; checkpoints of other settings are discarded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from ehrfm.callbacks import FAULT_CRASH_ENV
from ehrfm.finetune.data import TRAIN_SPLIT, FinetuneDataset
from ehrfm.finetune.resume import resume_folder

SETTINGS = ["--method", "per-task", "--context-length", "24", "--epochs", "3", "--batch-size", "4", "--patience", "3"]


def _finetune(model: Path, data: Path, out: Path, *extra: str, crash_after: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop(FAULT_CRASH_ENV, None)
    if crash_after:
        env[FAULT_CRASH_ENV] = str(crash_after)
    argv = ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), *SETTINGS, *extra]
    argv.append("progress_bar=false")
    return subprocess.run([sys.executable, "-m", "ehrfm", *argv], env=env, capture_output=True, text=True, timeout=600)


def test_killed_finetuning_resumes_to_the_uninterrupted_result(llama_export, ft_data, tasks, tmp_path):
    steps_per_epoch = math.ceil(len(FinetuneDataset(ft_data, tasks, TRAIN_SPLIT, 24)) / 4)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _finetune(llama_export, ft_data, straight).returncode == 0
    assert not resume_folder(straight).exists()  # removed once the model is saved

    crashed = _finetune(llama_export, ft_data, killed, crash_after=steps_per_epoch + 1)  # inside epoch 2
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    state = json.loads((resume_folder(killed) / "state.json").read_text())
    assert state["loop"]["epoch"] == 1 and state["loop"]["step"] == steps_per_epoch and not killed.exists()

    resumed = _finetune(llama_export, ft_data, killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming finetuning" in resumed.stderr and not resume_folder(killed).exists()
    a, b = (json.loads((run / "finetune.json").read_text()) for run in (straight, killed))
    assert a["history"] == b["history"] and a["best_epoch"] == b["best_epoch"]
    heads_a, heads_b = (load_file(str(run / "heads.safetensors")) for run in (straight, killed))
    assert all((heads_a[k] == heads_b[k]).all() for k in heads_a)
    backbone_a, backbone_b = (load_file(str(run / "backbone" / "model.safetensors")) for run in (straight, killed))
    assert all((backbone_a[k] == backbone_b[k]).all() for k in backbone_a)


def test_other_settings_start_over_and_a_foreign_folder_stops_the_run(llama_export, ft_data, tasks, tmp_path):
    steps_per_epoch = math.ceil(len(FinetuneDataset(ft_data, tasks, TRAIN_SPLIT, 24)) / 4)
    out = tmp_path / "ft"
    assert _finetune(llama_export, ft_data, out, crash_after=steps_per_epoch + 1).returncode == 137
    assert (resume_folder(out) / "state.json").exists()
    changed = _finetune(llama_export, ft_data, out, "--lr", "2e-4")
    assert changed.returncode == 0 and "other finetuning settings; starting over" in changed.stderr
    assert len(json.loads((out / "finetune.json").read_text())["history"]) == 3 and not resume_folder(out).exists()

    other = tmp_path / "other"
    foreign = resume_folder(other)
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = _finetune(llama_export, ft_data, other)
    assert refused.returncode == 2 and "other.resume" in refused.stderr, refused.stderr[-2000:]
    assert (foreign / "notes.txt").read_text() == "mine" and not other.exists()

"""`ehrfm launch local`: the same pretraining command through torchrun on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ehrfm.pretrain.parallel import free_port


def test_local_launch_runs_two_ranks(slurm_data, tmp_path):
    run = tmp_path / "local"
    exe = Path(sys.executable).with_name("ehrfm")
    result = subprocess.run(
        [
            str(exe),
            "launch",
            "local",
            "--nproc",
            "2",
            "--master-port",
            str(free_port()),
            "--",
            "--data",
            str(slurm_data),
            "--model",
            "llama",
            "--size",
            "tiny",
            "--out",
            str(run),
            "model.overrides.hidden_size=32",
            "model.overrides.num_hidden_layers=2",
            "data.context_length=64",
            "data.batch_size=2",
            "train.max_steps=4",
            "train.val_every=1000",
            "train.progress_bar=false",
            "train.save_probe=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "engine.json").read_text())["world_size"] == 2
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 4

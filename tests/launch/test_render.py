"""`ehrfm launch slurm --dry-run`: the rendered script, checked against a reviewed snapshot and by bash -n."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ehrfm.launch.local import torchrun_command
from ehrfm.launch.slurm import SlurmJob, render

SNAPSHOT = Path(__file__).parent / "snapshots" / "pretrain_2x8gpu.sbatch"
ARGS = [
    "--data",
    "/data/ehr/prepared",
    "--model",
    "llama",
    "--size",
    "medium",
    "--out",
    "/scratch/runs/llama-medium",
    "--strategy",
    "fsdp",
    "--config",
    "configs/pretrain.yaml",
    "train.max_steps=100000",
]


def test_dry_run_for_2_nodes_x_8_gpus_matches_the_reviewed_snapshot():
    exe = Path(sys.executable).with_name("ehrfm")
    out = subprocess.run(
        [
            str(exe),
            "launch",
            "slurm",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--cpus-per-task",
            "12",
            "--partition",
            "gpu",
            "--time",
            "2-00:00:00",
            "--setup",
            "source /opt/envs/ehrfm/bin/activate",
            "--dry-run",
            "--",
            *ARGS,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == SNAPSHOT.read_text()
    syntax = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_script_has_no_user_or_host_and_passes_args_through():
    text = render(SlurmJob(ARGS, nodes=3, gpus_per_node=4, setup="true"))
    assert "#SBATCH --nodes=3" in text and "#SBATCH --gpus-per-node=4" in text
    assert "--strategy fsdp --config configs/pretrain.yaml train.max_steps=100000" in text
    assert "--signal=B:USR1@300" in text and "--requeue" in text and "--open-mode=append" in text
    for forbidden in ("/home/", "/root/", "localhost", "127.0.0.1"):
        assert forbidden not in text


def test_srun_passes_cpus_per_task_to_the_step():
    """Slurm 22.05-23.02 do not hand the allocation's --cpus-per-task to srun steps (issue 14)."""
    text = render(SlurmJob(["--out", "r"], nodes=2, gpus_per_node=8, setup="true"))
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in srun


def test_cpu_nodes_default_to_one_process_and_no_gpu_line():
    text = render(SlurmJob(["--out", "r"], nodes=2, gpus_per_node=0, setup="true"))
    assert "--gpus-per-node" not in text and "PROCS_PER_NODE=1" in text


def test_out_is_required():
    with pytest.raises(ValueError, match="--out RUN"):
        render(SlurmJob(["--data", "d"], nodes=1))


def test_local_launcher_uses_torchrun_without_python():
    cmd = torchrun_command(2, ["--out", "r"], master_port=29555)
    assert Path(cmd[0]).name == "torchrun" and "--nproc-per-node=2" in cmd
    assert cmd[cmd.index("--no-python") + 2 :] == ["pretrain", "--out", "r"]


def test_launch_accepts_the_pretrain_subcommand_name():
    from ehrfm.launch.cli import _pretrain_args

    assert _pretrain_args(["--", "pretrain", "--data", "D", "--out", "R"]) == ["--data", "D", "--out", "R"]
    assert _pretrain_args(["--", "--data", "D"]) == ["--data", "D"]
    with pytest.raises(SystemExit, match=r"found 'finetune'"):
        _pretrain_args(["--", "finetune", "--data", "D"])

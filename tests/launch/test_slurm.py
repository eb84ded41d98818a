"""The sbatch script rendered by `ehrfm launch slurm`, run on a real two-node SLURM cluster (CPU, gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ehrfm.pretrain.parallel import free_port

pytestmark = pytest.mark.slurm

TRAIN = [
    "--model",
    "llama",
    "--size",
    "tiny",
    "model.overrides.hidden_size=32",
    "model.overrides.intermediate_size=64",
    "model.overrides.num_hidden_layers=2",
    "data.context_length=64",
    "data.batch_size=2",
    "train.max_steps=24",
    "checkpoint.every=4",
    "train.val_every=1000",
    "train.progress_bar=false",
    "train.save_probe=false",
]


def _submit(cluster, data: Path, run: Path, *extra: str) -> int:
    exe = Path(sys.executable).with_name("ehrfm")
    cmd = [
        str(exe),
        "launch",
        "slurm",
        "--nodes",
        "2",
        "--procs-per-node",
        "1",
        "--cpus-per-task",
        "1",
        "--master-port",
        str(free_port()),
        "--setup",
        f"export PATH={Path(sys.executable).parent}:$PATH",
        "--job-name",
        run.name,
        *extra,
        "--submit",
        "--",
        "--data",
        str(data),
        "--out",
        str(run),
        *TRAIN,
    ]
    out = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_records(run: Path) -> list[dict]:
    return [r for r in _metrics(run) if "loss" in r and "step" in r and not r.get("split")]


def _logs(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run / "logs").glob("*")))


def _explain(cluster, job: int, run: Path) -> str:
    return f"{_logs(run)}\n=== slurm daemons on job {job} ===\n{cluster.diagnose(job)}"


def test_two_node_job_runs_to_completion(slurm_cluster, slurm_data, tmp_path, record_job):
    run = tmp_path / "plain"
    started = time.time()
    job = _submit(slurm_cluster, slurm_data, run)
    state = slurm_cluster.wait(job, timeout=600)
    record_job("2 nodes x 1 process, 24 steps", time.time() - started, f"job {job} {state}")
    assert state == "COMPLETED", _explain(slurm_cluster, job, run)
    records = _train_records(run)
    assert records and records[-1]["step"] == 24
    engine = json.loads((run / "engine.json").read_text())
    assert engine["world_size"] == 2
    node_logs = sorted(p.name for p in (run / "logs").glob(f"job{job}-restart0-*.log"))
    assert node_logs == [f"job{job}-restart0-node0.log", f"job{job}-restart0-node1.log"]


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_final_loss(slurm_cluster, slurm_data, tmp_path, record_job):
    straight_run, preempted_run = tmp_path / "straight", tmp_path / "preempted"
    started = time.time()
    job = _submit(slurm_cluster, slurm_data, straight_run)
    assert slurm_cluster.wait(job, timeout=600) == "COMPLETED", _explain(slurm_cluster, job, straight_run)
    record_job("uninterrupted reference job", time.time() - started, f"job {job}")

    started = time.time()
    job = _submit(slurm_cluster, slurm_data, preempted_run)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 6 for r in _train_records(preempted_run)):
        time.sleep(0.5)
    assert _train_records(preempted_run), _logs(preempted_run)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    # the batch script asks training to checkpoint, then requeues; Slurm holds the requeued job
    # cred_expire + 1 = 11 s (about 20 s seen) before it restarts it
    assert slurm_cluster.wait(job, timeout=600) == "COMPLETED", _explain(slurm_cluster, job, preempted_run)
    record_job("preempted (USR1), requeued, resumed", time.time() - started, f"job {job}")

    logs = _logs(preempted_run)
    assert "caught USR1" in logs and "requeueing (restart 1" in logs
    assert list((preempted_run / "logs").glob(f"job{job}-restart1-*.log"))
    straight, resumed = _train_records(straight_run), _train_records(preempted_run)
    assert resumed[-1]["step"] == straight[-1]["step"] == 24
    final = {r["step"]: r["loss"] for r in resumed}
    assert final[24] == straight[-1]["loss"]  # bit-identical on CPU
    assert min(r["step"] for r in resumed if r["step"] > 6) <= 24  # it did continue after the preemption


def test_max_restarts_guard_stops_requeueing(slurm_cluster, slurm_data, tmp_path, record_job):
    run = tmp_path / "guarded"
    started = time.time()
    job = _submit(slurm_cluster, slurm_data, run, "--max-restarts", "0")
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 4 for r in _train_records(run)):
        time.sleep(0.5)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    state = slurm_cluster.wait(job, timeout=300)
    record_job("preempted with --max-restarts 0", time.time() - started, f"job {job} {state}")
    assert state == "FAILED", _explain(slurm_cluster, job, run)  # exit 75: checkpointed, not requeued
    logs = _logs(run)
    assert "caught USR1" in logs and "not requeueing: 0 restarts used" in logs
    assert not list((run / "logs").glob(f"job{job}-restart1-*.log"))
    # the preemption checkpoint is the last step trained, complete, and `latest` points at it
    last_step = _train_records(run)[-1]["step"]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last_step:08d}" and (run / "checkpoints" / latest / "COMPLETE").exists()

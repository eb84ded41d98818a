"""Checkpoint / resume: bit-identical loss trajectory after a crash, preemption by signal (exit 75), and
atomicity (a checkpoint killed mid-write is never resumed from)."""

from __future__ import annotations

import json
import signal
import time

import pytest

from ehrfm.loop import PREEMPTION_EXIT_CODE
from ehrfm.pretrain import checkpoint as ckpt

# dropout on: resuming must restore the RNG too, not only weights and data position
RESUME = [
    "train.max_steps=6",
    "checkpoint.every=3",
    "train.val_every=3",
    "model.overrides.embedding_dropout=0.1",
    "train.save_probe=false",
]


def _records(run):
    from ehrfm.metrics_log import read_metrics

    return {r["step"]: r for r in read_metrics(run) if r.get("split") != "val"}


def test_resume_after_crash_is_bit_identical(pt_data, tmp_path, run_pretrain):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_pretrain(pt_data, straight, "llama", *RESUME)
    # steps 1-3, checkpoint at 3, step 4, then the process dies without a checkpoint
    run_pretrain(pt_data, crashed, "llama", *RESUME, expect=137, crash_after=4)
    assert ckpt.read_state(ckpt.latest_checkpoint(crashed)).step == 3
    run_pretrain(pt_data, crashed, "llama", *RESUME)  # the same command again: resumes from step 3

    a, b = _records(straight), _records(crashed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        for key in ("loss", "grad_norm", "lr", "real_tokens", "padded_tokens"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    # the final states agree too: same validation history and the same weights
    sa, sb = ckpt.read_state(ckpt.latest_checkpoint(straight)), ckpt.read_state(ckpt.latest_checkpoint(crashed))
    assert sa.val_history == sb.val_history and sa.step == sb.step == 6
    wa, wb = (ckpt.load_consolidated_weights(ckpt.latest_checkpoint(r)) for r in (straight, crashed))
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_preemption_signal_checkpoints_and_exits_75(sig, pt_data, tmp_path, run_pretrain, pretrain_popen):
    run = tmp_path / "run"
    args = ["train.max_steps=100000", "checkpoint.every=0", "train.val_every=0"]
    proc = pretrain_popen(pt_data, run, "llama", *args)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTION_EXIT_CODE, err[-3000:]
    last = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert ckpt.read_state(ckpt.latest_checkpoint(run)).step == last  # the step was finished, then saved
    run_pretrain(pt_data, run, "llama", *args[1:], f"train.max_steps={last + 2}")  # requeued: resumes
    assert sorted(_records(run)) == list(range(1, last + 3))


def test_kill_during_checkpoint_write_is_never_latest(pt_data, tmp_path, run_pretrain):
    driver = tmp_path / "kill_driver.py"
    driver.write_text(
        """
import os, sys
from ehrfm.pretrain import checkpoint as ckpt
original = ckpt._save_weights
def save_then_die(engine, path):
    original(engine, path)  # shards on disk, marker not yet written
    if path.name.endswith("step_00000004"):
        os._exit(137)
ckpt._save_weights = save_then_die
from ehrfm.cli import main
sys.exit(main(sys.argv[1:]))
"""
    )
    run = tmp_path / "run"
    args = ["train.max_steps=6", "checkpoint.every=2", "train.val_every=0", "train.save_probe=false"]
    run_pretrain(pt_data, run, "llama", *args, driver=driver, expect=137)
    partial = ckpt.checkpoint_root(run) / ".tmp-step_00000004"
    assert partial.is_dir() and any(partial.iterdir()) and not (partial / ckpt.MARKER).exists()
    assert (ckpt.checkpoint_root(run) / "latest").read_text().strip() == "step_00000002"
    assert ckpt.latest_checkpoint(run).name == "step_00000002"

    run_pretrain(pt_data, run, "llama", *args)  # resumes from step 2, not from the half-written 4
    assert list(_records(run)) == [1, 2, 3, 4, 5, 6]
    assert ckpt.latest_checkpoint(run).name == "step_00000006"
    assert not list(ckpt.checkpoint_root(run).glob(".tmp-*"))  # leftovers pruned


def test_discovery_ignores_incomplete(tmp_path):
    root = ckpt.checkpoint_root(tmp_path)
    for step, complete in ((1, True), (2, True), (3, False)):
        d = root / ckpt.step_name(step)
        d.mkdir(parents=True)
        if complete:
            (d / ckpt.MARKER).write_text("")
    (root / ".tmp-step_00000004").mkdir()
    (root / ".tmp-step_00000004" / ckpt.MARKER).write_text("")  # marker written but never renamed
    (root / "latest").write_text("step_00000003")  # points at an incomplete folder
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    (root / "latest").write_text("step_00000001")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(ckpt.CheckpointError, match="step 3"):
        ckpt.find_checkpoint(tmp_path, 3)


def test_rng_state_round_trip():
    import random

    import numpy as np
    import torch

    state = json.loads(json.dumps(ckpt.rng_state()))  # JSON-able, no pickle
    a = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_early_stopping_with_patience_keeps_best(pt_data, tmp_path, run_pretrain):
    """lr = 0: validation never improves after the first evaluation, so patience 2 stops at the third."""
    run = tmp_path / "run"
    run_pretrain(
        pt_data,
        run,
        "llama",
        "optim.lr=0",
        "train.max_steps=50",
        "train.val_every=1",
        "train.patience=2",
        "checkpoint.every=0",
        "checkpoint.keep=1",
        "train.save_probe=false",
    )
    state = ckpt.read_state(ckpt.latest_checkpoint(run))
    assert state.stopped_early and state.step == 3 and state.best_step == 1 and state.bad_evals == 2
    assert [v["step"] for v in state.val_history] == [1, 2, 3]
    root = ckpt.checkpoint_root(run)
    assert (root / "best").read_text().strip() == "step_00000001" and ckpt.is_complete(root / "step_00000001")
    assert sorted(_records(run)) == [1, 2, 3]


def test_version_2_trainer_state_still_reads(tmp_path):
    """State version 2 named the best validation loss best_val_loss (inf before any validation); it is read
    as LoopState.best_score (None for inf)."""
    import json

    for saved, expected in ((2.5, 2.5), (float("inf"), None)):
        payload = {"version": 2, "step": 7, "best_val_loss": saved, "best_step": 4, "bad_evals": 1, "val_history": []}
        (tmp_path / ckpt.STATE_FILE).write_text(json.dumps(payload))
        state = ckpt.read_state(tmp_path)
        assert (state.step, state.best_score, state.best_step, state.bad_evals, state.epoch) == (7, expected, 4, 1, 0)
    (tmp_path / ckpt.STATE_FILE).write_text(json.dumps({"version": 1, "step": 7}))
    with pytest.raises(ckpt.CheckpointError, match="version 1"):
        ckpt.read_state(tmp_path)

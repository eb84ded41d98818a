"""The shared training loop and its callbacks, on scripted steps and scores (hand-computed expectations)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from ehrfm.callbacks import (
    FAULT_CRASH_ENV,
    Checkpointing,
    KeepBestWeights,
    Preemption,
    Throughput,
    Validation,
    fault_injection_from_env,
)
from ehrfm.loop import PREEMPTION_EXIT_CODE, Callback, Loop, LoopState


def counting_step(batches) -> dict:
    return {"loss": float(next(batches)), "real_tokens": 10, "padded_tokens": 16}


def scripted(scores):
    """evaluate() returning the next of ``scores`` as val_loss."""
    it = iter(scores)
    return lambda loop: {"val_loss": next(it)}


class Saves(list):
    def __call__(self, best: bool) -> None:
        self.append((self.step, best))


def endless():
    return iter(range(10**9))


def test_step_limit_and_validation_schedule_and_checkpoints():
    saves = Saves()
    state = LoopState()
    val = Validation(scripted([5.0, 4.0, 4.5]), score="val_loss", every_steps=3, at_last_step=True)

    class Track(Callback):
        def on_step_end(self, loop, record):
            saves.step = loop.state.step

    loop = Loop(state, counting_step, [Track(), val, Checkpointing(saves, every=4)], max_steps=7)
    stream = endless()
    assert loop.fit(lambda epoch: stream) == 0
    assert state.step == 7 and state.epoch == 0
    assert loop.epoch_records == []  # an endless stream keeps no per-step records (they would grow all run)
    # validations after steps 3, 6 and the last step 7; best at 3, improved at 6, not at 7
    assert [v["step"] for v in state.val_history] == [3, 6, 7]
    assert (state.best_score, state.best_step, state.bad_evals) == (4.0, 6, 1)
    # saves: best (3), periodic (4), best (6), final (7, not best)
    assert saves == [(3, True), (4, False), (6, True), (7, False)]


def test_early_stopping_after_patience_and_no_steps_after_a_resumed_stop():
    state = LoopState()
    val = Validation(scripted([3.0, 3.0, 2.9, 3.5, 3.1]), score="val_loss", every_steps=1, patience=2)
    stream = endless()
    assert Loop(state, counting_step, [val], max_steps=100).fit(lambda epoch: stream) == 0
    # 3.0 best, 3.0 not strictly better (1), 2.9 best, 3.5 (1), 3.1 (2) -> stop after step 5
    assert state.step == 5 and state.stopped_early and state.best_step == 3 and state.bad_evals == 2
    again = Loop(state, counting_step, [], max_steps=100)
    assert again.fit(lambda epoch: stream) == 0 and state.step == 5


def test_higher_is_better_and_nan_never_improves():
    scores = iter([float("nan"), 0.2, float("nan"), 0.1])
    val = Validation(lambda loop: {"auprc": next(scores)}, score="auprc", higher_is_better=True, every_steps=1)
    state = LoopState()
    stream = endless()
    Loop(state, counting_step, [val], max_steps=4).fit(lambda epoch: stream)
    # the first validation is the best so far even when NaN; 0.2 is not "better" than NaN either
    assert math.isnan(state.best_score) and state.best_step == 1 and state.bad_evals == 3


def test_epochs_validate_at_epoch_end_and_keep_the_best_weights():
    model = torch.nn.Linear(1, 1, bias=False)
    keep = KeepBestWeights(model)

    def step(batches):
        value = next(batches)
        with torch.no_grad():
            model.weight.fill_(value)
        return {"loss": value}

    val = Validation(
        lambda loop: {"val_loss": abs(model.weight.item() - 5)}, score="val_loss", at_epoch_end=True, patience=2
    )
    state = LoopState()
    epochs = {0: [1, 2], 1: [4, 5], 2: [7, 8], 3: [9, 9], 4: [0, 0]}
    Loop(state, step, [val, keep], max_epochs=5).fit(lambda epoch: iter(epochs[epoch]))
    # epoch-end weights 2, 5, 8, 9 -> distances 3, 0, 3, 4: best epoch 1 (step 4), stop after epoch 3
    assert [v["epoch"] for v in state.val_history] == [0, 1, 2, 3]
    assert state.best_step == 4 and state.stopped_early and state.epoch == 4 and state.step == 8
    keep.restore()
    assert model.weight.item() == 5


def test_throughput_fields():
    record = {"step_time_s": 2.0, "real_tokens": 100, "padded_tokens": 160}

    class FakeLoop:
        pass

    Throughput(flops_per_token=10.0, peak_flops=400.0, world_size=2).on_step_end(FakeLoop(), record)
    assert record["tokens_per_s"] == 50.0 and record["mfu"] == 10.0 * 160 / 2.0 / (400.0 * 2)
    assert record["peak_memory_mb"] > 0


def test_preemption_by_signal_finishes_the_step_saves_and_exits_75():
    saves = Saves()
    preemption = Preemption()

    def step(batches):
        saves.step = next(batches)
        if saves.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return {}

    previous = signal.getsignal(signal.SIGUSR1)
    stream = iter(range(1, 100))
    code = Loop(LoopState(), step, [preemption, Checkpointing(saves)], max_steps=50).fit(lambda e: stream)
    assert code == PREEMPTION_EXIT_CODE and saves == [(2, False)]
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored


def test_fault_injection_comes_only_from_the_environment(monkeypatch):
    monkeypatch.delenv(FAULT_CRASH_ENV, raising=False)
    assert fault_injection_from_env() == []
    script = (
        "from ehrfm.callbacks import fault_injection_from_env\n"
        "from ehrfm.loop import Loop, LoopState\n"
        "stream = iter(range(100))\n"
        "Loop(LoopState(), lambda b: {'x': next(b)}, fault_injection_from_env(), max_steps=10).fit(lambda e: stream)\n"
        "print('finished')\n"
    )
    env = {**os.environ, FAULT_CRASH_ENV: "3"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 137 and "finished" not in proc.stdout


def test_an_ended_endless_stream_is_an_error():
    with pytest.raises(RuntimeError, match="ended at step 2"):
        Loop(LoopState(), counting_step, [], max_steps=5).fit(lambda epoch: iter([1, 2]))

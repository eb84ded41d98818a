"""The rules of a training run, one :class:`ehrfm.loop.Callback` each: preemption, throughput / MFU, metric
records, validation + early stopping, checkpoint timing, keeping the best weights, fault injection (tests).

Order matters where a callback reads what an earlier one decided in the same step (``loop.events``):
Preemption before Checkpointing (a preempted step is saved), Validation before Checkpointing and
KeepBestWeights (the best step is saved / kept), Throughput before LogTrainRecords (its fields are logged).
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable

import torch

from .logging import get_logger
from .loop import PREEMPTION_EXIT_CODE, Callback, Loop
from .metrics_log import MetricsLogger, peak_memory_mb

log = get_logger(__name__)

FAULT_CRASH_ENV = "EHRFM_FAULT_CRASH_AFTER_STEP"  # tests: die like a SIGKILL after this optimizer step


class Preemption(Callback):
    """SIGTERM / SIGUSR1 set a flag; the loop finishes the step, checkpoints and exits with code 75.

    Under a launcher that cannot signal the workers themselves (SLURM: USR1 reaches only the batch shell, and
    torchrun would die of it), the launcher creates the file named by ``$EHRFM_PREEMPT_FILE`` instead; its
    existence counts as the same request. Multi-process steps agree on it: the step function reads
    :attr:`requested` and returns the ranks' verdict as ``record["preempt"]`` (this rank's own request when the
    key is absent)."""

    def __init__(self) -> None:
        self._signalled = False
        self._file = os.environ.get("EHRFM_PREEMPT_FILE") or None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self._signalled or (self._file is not None and os.path.exists(self._file))

    def _handle(self, signum, frame) -> None:
        self._signalled = True
        log.warning("received signal %d: finishing the step, then checkpointing", signum)

    def on_fit_start(self, loop: Loop) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, loop: Loop, record: dict) -> None:
        if record.pop("preempt", self.requested):
            loop.events.preempt = True
            loop.request_exit(PREEMPTION_EXIT_CODE)

    def close(self, loop: Loop) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Throughput(Callback):
    """Adds tokens_per_s (real tokens), peak_memory_mb and, with a known peak, mfu to each training record.

    Reads ``real_tokens`` and ``padded_tokens`` (summed over ranks) and ``step_time_s`` of the record.
    flops_per_token: training FLOPs per token (``pretrain.metrics.flops_per_token``); peak_flops: per-device
    peak FLOP/s (0 = unknown: no mfu)."""

    def __init__(self, flops_per_token: float = 0.0, peak_flops: float = 0.0, world_size: int = 1) -> None:
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size

    def on_step_end(self, loop: Loop, record: dict) -> None:
        seconds = record["step_time_s"]
        record["tokens_per_s"] = record.get("real_tokens", 0) / seconds
        record["peak_memory_mb"] = peak_memory_mb()
        if self.peak_flops > 0 and self.flops_per_token > 0:
            achieved = self.flops_per_token * record.get("padded_tokens", 0) / seconds
            record["mfu"] = achieved / (self.peak_flops * self.world_size)


class LogTrainRecords(Callback):
    """Writes every ``every``-th training record (and the last step's) to the metrics sink; closes the sink."""

    def __init__(self, sink: MetricsLogger, every: int = 1) -> None:
        self.sink, self.every = sink, every

    def on_step_end(self, loop: Loop, record: dict) -> None:
        if loop.state.step % self.every == 0 or loop.events.final:
            self.sink.log(record)

    def close(self, loop: Loop) -> None:
        self.sink.close()


class Validation(Callback):
    """Validation, best-score tracking and early stopping.

    evaluate(loop) -> dict of scores containing ``score``; runs every ``every_steps`` steps (0 = never by
    step count), after the last step when ``at_last_step``, and after each epoch when ``at_epoch_end``. The
    first validation is the best so far whatever its value; later ones are better when strictly higher
    (``higher_is_better``) or lower, so a NaN score never improves on one. After ``patience`` validations
    without improvement (0 = never) the loop stops early. Each validation is appended to
    ``state.val_history`` as ``{"step", **scores}`` (plus ``"epoch"`` at an epoch end) and logged as a
    ``"split": "val"`` record."""

    def __init__(
        self,
        evaluate: Callable[[Loop], dict],
        *,
        score: str,
        higher_is_better: bool = False,
        every_steps: int = 0,
        at_last_step: bool = False,
        at_epoch_end: bool = False,
        patience: int = 0,
        sink: MetricsLogger | None = None,
    ) -> None:
        self.evaluate, self.score, self.higher_is_better = evaluate, score, higher_is_better
        self.every_steps, self.at_last_step, self.at_epoch_end = every_steps, at_last_step, at_epoch_end
        self.patience, self.sink = patience, sink

    def on_step_end(self, loop: Loop, record: dict) -> None:
        step = loop.state.step
        if (self.every_steps and step % self.every_steps == 0) or (self.at_last_step and loop.events.final):
            self._validate(loop, {})

    def on_epoch_end(self, loop: Loop) -> None:
        if self.at_epoch_end:
            self._validate(loop, {"epoch": loop.state.epoch})

    def _improves(self, score: float, best: float | None) -> bool:
        if best is None:
            return True
        return score > best if self.higher_is_better else score < best

    def _validate(self, loop: Loop, where: dict) -> None:
        state = loop.state
        scores = self.evaluate(loop)
        state.val_history.append({"step": state.step, **where, **scores})
        if self.sink is not None:
            self.sink.log({"split": "val", "step": state.step, **where, **scores})
        loop.events.validated = True
        score = scores[self.score]
        if self._improves(score, state.best_score):
            state.best_score, state.best_step, state.bad_evals = score, state.step, 0
            loop.events.best = True
            return
        state.bad_evals += 1
        if self.patience and state.bad_evals >= self.patience:
            loop.stop_early()
            log.info(
                "early stopping at step %d: %s %.4f at step %d was not improved on in %d validations",
                state.step,
                self.score,
                state.best_score if state.best_score is not None else math.nan,
                state.best_step,
                state.bad_evals,
            )


class Checkpointing(Callback):
    """Calls ``save(best)`` after a step that is a multiple of ``every`` (0 = never by count), the last step,
    a new best validation, a preemption or an early stop; at most once per step."""

    def __init__(self, save: Callable[[bool], None], every: int = 0) -> None:
        self.save, self.every = save, every

    def on_step_end(self, loop: Loop, record: dict) -> None:
        events, step = loop.events, loop.state.step
        periodic = bool(self.every) and step % self.every == 0
        if events.best or events.final or events.preempt or loop.state.stopped_early or periodic:
            self.save(events.best)


class KeepBestWeights(Callback):
    """A host copy of ``model``'s state dict at each new best validation; :meth:`restore` loads it back."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.best: dict | None = None

    def _keep(self, loop: Loop) -> None:
        if loop.events.best:
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def on_step_end(self, loop: Loop, record: dict) -> None:
        self._keep(loop)

    def on_epoch_end(self, loop: Loop) -> None:
        self._keep(loop)

    def restore(self) -> None:
        if self.best is None:
            raise RuntimeError("no validation ran: there are no best weights to restore")
        self.model.load_state_dict(self.best)


class CrashAfterStep(Callback):
    """Fault injection for tests: the process dies like a SIGKILL (exit 137, no checkpoint, no cleanup) right
    after step ``step`` -- before that step's validation and checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, loop: Loop, record: dict) -> None:
        if loop.state.step == self.step:
            os._exit(137)


def fault_injection_from_env() -> list[Callback]:
    """[:class:`CrashAfterStep`] when ``$EHRFM_FAULT_CRASH_AFTER_STEP`` names a step, else []. Tests set it; it
    is not part of any user config."""
    value = os.environ.get(FAULT_CRASH_ENV, "").strip()
    return [CrashAfterStep(int(value))] if value else []

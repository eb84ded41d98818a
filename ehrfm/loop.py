"""One training loop for pretraining and finetuning, with callbacks (the OLMo-core pattern).

The loop owns the control flow only: epochs over a batch source, optimizer steps, step timing, stopping and
the exit code. What a step computes is the caller's ``train_step``; every rule about *when* something happens
(validation, early stopping, checkpoints, preemption, throughput, logging, fault injection) is a
:class:`Callback` from :mod:`ehrfm.callbacks`, called in list order:

    loop = Loop(LoopState(), trainer.train_step, [Preemption(), Throughput(...), LogTrainRecords(sink),
                Validation(...), Checkpointing(...)], max_steps=1000)
    exit_code = loop.fit(lambda epoch: iter(loader))

Per step: ``record = train_step(batches)`` (consumes what it needs from the epoch's iterator; raising
``StopIteration`` ends the epoch), then ``state.step += 1``, the loop adds ``step`` and ``step_time_s`` (s),
and every callback's ``on_step_end(loop, record)`` runs. At the end of each finite epoch ``on_epoch_end(loop)``
runs. :class:`StepEvents` carries what one callback decided for the others in the same step (a new best
validation, a preemption). The state (:class:`LoopState`) is what a resume needs of the loop; pretraining
checkpoints it inside its ``TrainerState``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

PREEMPTION_EXIT_CODE = 75  # EX_TEMPFAIL: preempted, a checkpoint was written, requeue the same command


@dataclasses.dataclass
class LoopState:
    """The loop's progress (JSON-able; checkpointed by pretraining, mirrored by tests).

    best_score: the best validation score so far (its direction is the Validation callback's), None before
    the first validation; best_step: the step it was reached at (-1: none); bad_evals: validations since the
    last improvement; val_history: one dict per validation, ``{"step", "epoch", **scores}``."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the current pass over a finite training set (0-based); stays 0 for an endless stream
    best_score: float | None = None
    best_step: int = -1
    bad_evals: int = 0
    stopped_early: bool = False
    val_history: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StepEvents:
    """What happened in the current step (or epoch end), for the callbacks that run after the one that saw it.

    final: the last step (``max_steps``) or the end of the last epoch; validated / best: a validation ran /
    reached a new best score; preempt: the ranks agreed to stop for a preemption."""

    final: bool = False
    validated: bool = False
    best: bool = False
    preempt: bool = False


class Callback:
    """Hooks of :class:`Loop`; each default does nothing."""

    def on_fit_start(self, loop: Loop) -> None:
        """Before the first step (after any resume has set ``loop.state``)."""

    def on_step_end(self, loop: Loop, record: dict) -> None:
        """After each optimizer step; ``record`` (mutable) is the step's training record."""

    def on_epoch_end(self, loop: Loop) -> None:
        """After the last step of a finite epoch."""

    def on_fit_end(self, loop: Loop) -> None:
        """After the loop ended normally or by an exit request (not after an exception)."""

    def close(self, loop: Loop) -> None:
        """Always, last (also after an exception): release files, signal handlers, progress bars."""


class Loop:
    """Runs ``train_step`` until ``max_steps``, ``max_epochs``, an early stop or an exit request.

    ``max_steps`` None: no step limit (finetuning counts epochs); ``max_epochs`` None: one endless epoch
    (pretraining streams forever and counts steps). At least one of the two must be set."""

    def __init__(
        self,
        state: LoopState,
        train_step: Callable[[Iterator], dict],
        callbacks: list[Callback],
        *,
        max_steps: int | None = None,
        max_epochs: int | None = None,
    ) -> None:
        if max_steps is None and max_epochs is None:
            raise ValueError("Loop needs max_steps or max_epochs")
        self.state = state
        self.train_step = train_step
        self.callbacks = list(callbacks)
        self.max_steps = max_steps
        self.max_epochs = max_epochs
        self.events = StepEvents()
        # training records of the current epoch, kept for finite epochs only (an endless stream would grow it
        # by one record per step for the whole run)
        self.epoch_records: list[dict] = []
        self.exit_code: int | None = None

    # -- requests from callbacks ------------------------------------------------------------------------
    def stop_early(self) -> None:
        """End the run after this step (exit code 0); remembered in the state so a resume does not go on."""
        self.state.stopped_early = True

    def request_exit(self, code: int) -> None:
        """End the run after this step's callbacks with process exit code ``code``."""
        self.exit_code = code

    # -- the loop ---------------------------------------------------------------------------------------
    def _done(self) -> bool:
        return (
            self.exit_code is not None
            or self.state.stopped_early
            or (self.max_steps is not None and self.state.step >= self.max_steps)
            or (self.max_epochs is not None and self.state.epoch >= self.max_epochs)
        )

    def fit(self, epoch_batches: Callable[[int], Iterator]) -> int:
        """Train; returns the exit code (0, or what a callback requested). ``epoch_batches(epoch)`` gives the
        batch iterator of an epoch (an endless one when ``max_epochs`` is None)."""
        try:
            for callback in self.callbacks:
                callback.on_fit_start(self)
            while not self._done():
                self._run_epoch(iter(epoch_batches(self.state.epoch)))
            for callback in self.callbacks:
                callback.on_fit_end(self)
        finally:
            for callback in self.callbacks:
                callback.close(self)
        return self.exit_code or 0

    def _run_epoch(self, batches: Iterator) -> None:
        self.epoch_records = []
        while not self._done():
            self.events = StepEvents(final=self.max_steps is not None and self.state.step + 1 == self.max_steps)
            started = time.perf_counter()
            try:
                record = self.train_step(batches)
            except StopIteration:  # the epoch's batches ran out
                break
            self.state.step += 1
            record["step"] = self.state.step
            record["step_time_s"] = time.perf_counter() - started
            if self.max_epochs is not None:
                self.epoch_records.append(record)
            for callback in self.callbacks:
                callback.on_step_end(self, record)
        else:
            return  # stopped inside the epoch (step limit, early stop, exit request): no epoch end
        if self.max_epochs is None:
            raise RuntimeError(f"the endless batch stream ended at step {self.state.step}")
        if not self.epoch_records:
            raise RuntimeError(f"epoch {self.state.epoch} has no batch")
        self.events = StepEvents(final=self.state.epoch + 1 == self.max_epochs)
        for callback in self.callbacks:
            callback.on_epoch_end(self)
        self.state.epoch += 1

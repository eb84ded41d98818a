"""Order-preserving parallel map over worker processes, for the per-shard work of `ehrfm prepare --jobs N`.

Results come back in input order, so whatever the parent writes from them (shards, tallies, labels) is the
same bytes for any N: the parallel run differs from the sequential one only in *where* each item is computed.
With ``jobs == 1`` everything runs in this process (no pool, no pickling).

One :class:`ShardPool` serves a whole `ehrfm prepare` (FHIR conversion and both passes), so its workers start
once. Workers are started with the ``spawn`` method (polars' thread pool does not survive ``fork``), each with
a polars thread pool of ``cores // jobs`` threads so that N workers do not oversubscribe the cores. A map's
shared, read-only ``context`` (configuration, vocabulary, ...) is pickled once in the parent and unpickled
once per worker and map, not once per item. At most ``2 * jobs`` items are in flight, so finished results
never pile up in memory faster than the parent consumes them.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_map_ids = itertools.count()
_worker_context: tuple[int, Any] = (-1, None)  # (map id, unpickled context) cached in a worker process


def _call_with_context(fn: Callable[[T, Any], R], item: T, map_id: int, blob: bytes) -> R:
    global _worker_context
    if _worker_context[0] != map_id:
        _worker_context = (map_id, pickle.loads(blob))
    return fn(item, _worker_context[1])


def _limit_threads(threads: int) -> None:
    """Pool initializer: runs before the first task imports polars, which reads its thread count once."""
    os.environ["POLARS_MAX_THREADS"] = str(threads)


class ShardPool:
    """``jobs`` worker processes (none for ``jobs == 1``) for the lifetime of a ``with`` block."""

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.jobs = jobs
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> ShardPool:
        if self.jobs > 1:
            context = multiprocessing.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // self.jobs)
            self._executor = ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=context, initializer=_limit_threads, initargs=(threads,)
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, fn: Callable[[T, Any], R], items: Iterable[T], context: Any = None) -> Iterator[R]:
        """``fn(item, context)`` for each item, in input order (``fn`` must be a top-level function). An
        exception in a worker is re-raised here, for its item."""
        if self._executor is None:
            for item in items:
                yield fn(item, context)
            return
        map_id, blob = next(_map_ids), pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)
        pending: deque = deque()
        try:
            for item in items:
                pending.append(self._executor.submit(_call_with_context, fn, item, map_id, blob))
                if len(pending) >= 2 * self.jobs:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

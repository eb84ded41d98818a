"""Order-preserving parallel map over worker processes, for the per-shard work of `ehrfm prepare --jobs N`.

Results come back in input order, so whatever the parent writes from them (shards, tallies, labels) is the
same bytes for any N: the parallel run differs from the sequential one only in *where* each item is computed.
With ``jobs == 1`` everything runs in this process (no pool, no pickling).

Workers are started with the ``spawn`` method (polars' thread pool does not survive ``fork``); a worker's
shared context (configuration, vocabulary, ...) is sent once per worker through ``initializer`` rather than
once per item. At most ``2 * jobs`` items are in flight, so finished results never pile up in memory faster
than the parent consumes them.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    jobs: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """``fn(item)`` for each item, in input order, computed by ``jobs`` processes (``fn`` and ``initializer``
    must be importable top-level functions). An exception in a worker is re-raised here, for its item."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        iterator = iter(items)
        try:
            for item in iterator:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * jobs:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

"""Readable logs: one format for every stage, rank-aware under torch.distributed."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname).1s [%(name)s%(rank)s] %(message)s"


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = os.environ.get("RANK")
        record.rank = f" r{rank}" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        return True


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the `ehrfm` logger tree once (idempotent)."""
    root = logging.getLogger("ehrfm")
    root.setLevel(level if isinstance(level, int) else level.upper())
    if not any(getattr(h, "_ehrfm", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        handler._ehrfm = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("ehrfm") else f"ehrfm.{name}")

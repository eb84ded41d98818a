"""Real-token fraction of packed vs padded batches over one pass of a split (what the issue asks to report)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from .stream import EhrDataLoader, PatientStream, StreamConfig


def count_slots(batches: Iterable[dict]) -> dict[str, int]:
    """Token slots of ``batches`` (each with an ``attention_mask`` (B, T)): real tokens (mask 1), all slots
    (B x T summed), batches and rows."""
    counts = {"real_tokens": 0, "token_slots": 0, "batches": 0, "rows": 0}
    for batch in batches:
        mask = batch["attention_mask"]
        counts["real_tokens"] += int(mask.sum())
        counts["token_slots"] += mask.numel()
        counts["batches"] += 1
        counts["rows"] += mask.shape[0]
    return counts


def packing_report(
    data_dir: Path, split: str, context_length: int, batch_size: int = 8, long_sequences: str = "truncate"
) -> dict:
    """One epoch of ``split`` in both modes: real / total token slots, batches, rows and loader tokens/s.

    ``long_sequences="truncate"`` (default) keeps each patient's most recent ``context_length`` tokens, the
    setting where padding wastes most; "split" cuts long patients into full-length chunks.
    """
    report = {"context_length": context_length, "batch_size": batch_size, "long_sequences": long_sequences}
    for mode in ("packed", "padded"):
        cfg = StreamConfig(
            context_length=context_length,
            batch_size=batch_size,
            mode=mode,
            infinite=False,
            long_sequences=long_sequences,
        )
        started = time.perf_counter()
        counts = count_slots(EhrDataLoader(PatientStream(data_dir, split, cfg)))
        seconds = time.perf_counter() - started
        real = counts["real_tokens"]
        report[mode] = {
            **counts,
            "real_token_fraction": real / max(counts["token_slots"], 1),
            "loader_tokens_per_s": real / max(seconds, 1e-9),
        }
    # naive padding: one patient per row, every row padded to the full context length
    report["padded_to_context"] = {
        "real_token_fraction": report["padded"]["real_tokens"] / max(report["padded"]["rows"] * context_length, 1)
    }
    return report

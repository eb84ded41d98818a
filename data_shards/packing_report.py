"""Real-token fraction of packed vs padded batches over one pass of a split (what the issue asks to report)."""

from __future__ import annotations

import time
from pathlib import Path

from .stream import EhrDataLoader, PatientStream, StreamConfig


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
        real = slots = batches = rows = 0
        started = time.perf_counter()
        for batch in EhrDataLoader(PatientStream(data_dir, split, cfg)):
            mask = batch["attention_mask"]
            real += int(mask.sum())
            slots += mask.numel()
            batches += 1
            rows += mask.shape[0]
        seconds = time.perf_counter() - started
        report[mode] = {
            "real_tokens": real,
            "token_slots": slots,
            "real_token_fraction": real / max(slots, 1),
            "batches": batches,
            "rows": rows,
            "loader_tokens_per_s": real / max(seconds, 1e-9),
        }
    # naive padding: one patient per row, every row padded to the full context length
    report["padded_to_context"] = {
        "real_token_fraction": report["padded"]["real_tokens"] / max(report["padded"]["rows"] * context_length, 1)
    }
    return report

"""Where a training loop's records go, on rank 0: per-step JSONL (``RUN/metrics.jsonl``), TensorBoard
(``RUN/tensorboard``) and a tqdm progress bar; without a run folder, the progress bar alone.

A training record carries at least ``step``; validation records carry ``"split": "val"``. The fields of
pretraining's records are listed in :mod:`ehrfm.pretrain.metrics`.
"""

from __future__ import annotations

import json
import math
import resource
from collections.abc import Callable
from pathlib import Path

import torch


def peak_memory_mb() -> float:
    """CUDA max allocated memory (MiB), else this process's max resident set size (MiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLogger:
    """Writes records when ``enabled`` (rank 0); other ranks get a no-op logger.

    run_dir: where metrics.jsonl and tensorboard/ go (None: no files). total_steps / start_step: the
    progress bar's range (steps). describe_validation(record) -> one line printed under the bar for each
    validation record."""

    def __init__(
        self,
        run_dir: Path | None,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        desc: str = "train",
        describe_validation: Callable[[dict], str] | None = None,
    ) -> None:
        self.enabled = enabled
        self.describe_validation = describe_validation
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if run_dir is not None:
            run_dir = Path(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is a dependency; keep training if an environment lacks it
                self.tb = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
        if self.file is not None:
            self.file.write(json.dumps(clean) + "\n")
        step = clean.get("step", 0)
        validation = clean.get("split") == "val"
        if self.tb is not None:
            prefix = "val/" if validation else "train/"
            for key, value in clean.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(float(value)):
                    self.tb.add_scalar(prefix + key, value, step)
        if self.bar is None:
            return
        if validation:
            if self.describe_validation is not None:
                self.bar.write(f"step {step}: {self.describe_validation(clean)}")
            return
        self.bar.n = step
        shown = {"loss": ".4f", "lr": ".2e", "tokens_per_s": ".0f"}
        self.bar.set_postfix({k: format(clean[k], f) for k, f in shown.items() if clean.get(k) is not None})

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` in order ([] when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

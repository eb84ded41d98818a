"""Resumable pipeline stages shared by `ehrfm demo` and `ehrfm ablate`.

Each stage writes one folder and is skipped when that folder is already complete (the marker file every
stage writes last), so an interrupted demo or ablation picks up where it stopped. Pretraining runs as its
own `ehrfm pretrain` process: it resumes from its latest checkpoint by itself, and a fresh process keeps
Accelerate/DeepSpeed global state out of the caller.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..errors import EhrfmError
from ..logging import get_logger
from ..outputs import claim_run_dir

log = get_logger(__name__)
T = TypeVar("T")

METRICS = ("auroc", "auprc", "brier")


@dataclass
class PretrainSpec:
    """One `ehrfm pretrain` run; ``overrides`` are extra ``key=value`` of ``PretrainConfig``."""

    architecture: str = "llama"
    size: str = "tiny"
    steps: int = 200
    context_length: int = 256
    batch_size: int = 8
    overrides: list[str] = field(default_factory=list)

    def command(self, data: Path, run: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ehrfm.cli",
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(run),
            "--model",
            self.architecture,
            "--size",
            self.size,
            "--strategy",
            "ddp",
            f"train.max_steps={self.steps}",
            f"data.context_length={self.context_length}",
            f"data.batch_size={self.batch_size}",
            f"train.val_every={max(self.steps // 4, 1)}",
            f"checkpoint.every={max(self.steps // 2, 1)}",
            "checkpoint.keep=1",
            *self.overrides,
        ]


def _done(folder: Path, marker: str) -> bool:
    return (Path(folder) / marker).exists()


def pretrain_stage(data: Path, run: Path, spec: PretrainSpec, *, quiet: bool = False) -> Path:
    """Pretrain (or resume) into ``run``; returns it. Raises with the log's tail when the process fails."""
    if _done(run, "PRETRAIN_COMPLETE"):
        return run
    claim_run_dir(run, "pretrain", inputs=[data])
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if quiet:
        env["PYTHONWARNINGS"] = "ignore"
    cmd = spec.command(data, run) + (["train.progress_bar=false"] if quiet else [])
    log.info("%s", " ".join(cmd[1:]))
    log_path = run / "pretrain.log"  # quiet runs (ablation) log here; the demo shows the progress bar
    if quiet:
        with open(log_path, "a") as stream:
            proc = subprocess.run(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT)
    else:
        proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:  # its own error line is above (or in the log's tail); one line here
        tail = log_path.read_text()[-3000:] if quiet else ""
        raise EhrfmError(
            f"`ehrfm pretrain` failed with exit code {proc.returncode} (run {run}){chr(10) + tail if tail else ''}"
        )
    (run / "PRETRAIN_COMPLETE").write_text(" ".join(cmd[1:]) + "\n")
    return run


def export_stage(run: Path, hf_dir: Path) -> Path:
    from ..pretrain.export import export

    if not _done(hf_dir, "ehrfm_export.json"):
        export(run, hf_dir)
    return hf_dir


def finetune_stage(
    hf_dir: Path,
    data: Path,
    ft_dir: Path,
    *,
    method: str = "mpf",
    tasks: list[str] | None = None,
    epochs: int = 3,
    context_length: int = 256,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    train_fraction: float = 1.0,
    seed: int = 42,
    init: str = "pretrained",
) -> Path:
    from ..finetune.config import FinetuneConfig
    from ..finetune.train import finetune

    if not _done(ft_dir, "finetune.json"):
        cfg = FinetuneConfig(
            method=method,
            tasks=list(tasks or []),
            epochs=epochs,
            context_length=context_length,
            learning_rate=learning_rate,
            batch_size=batch_size,
            train_fraction=train_fraction,
            seed=seed,
            pos_weight="auto",
            init=init,
        )
        finetune(hf_dir, data, ft_dir, cfg)
    return ft_dir


def dropping_one_class_tasks(stage: Callable[[list[str]], T], tasks: list[str], name: str) -> tuple[T, dict[str, str]]:
    """Run ``stage(tasks)``; when it refuses a task the data leaves with one class in training (a
    ``FinetuneInputError`` naming the task, e.g. at a small data fraction), drop that task and run it again.
    Returns the stage's result and {dropped task: reason}; the last task's refusal is raised."""
    from ..finetune.data import FinetuneInputError

    kept, dropped = list(tasks), {}
    while True:
        try:
            return stage(kept), dropped
        except FinetuneInputError as err:
            if err.task not in kept or len(kept) == 1:
                raise
            dropped[err.task] = str(err)
            kept.remove(err.task)
            log.warning("%s: %s; going on without it", name, err)


def evaluate_stage(ft_dir: Path, data: Path, out: Path, *, n_boot: int = 1000, seed: int = 0) -> dict:
    from ..finetune.evaluate import evaluate, load_metrics

    if _done(out, "metrics.json"):
        return load_metrics(out)
    return evaluate(ft_dir, data, "test", out, n_boot=n_boot, seed=seed)


def forecast_stage(
    hf_dir: Path,
    data: Path,
    out: Path,
    *,
    samples: int,
    context_length: int,
    max_new_tokens: int,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Zero-shot forecasts of the test split (`ehrfm forecast`): every task a rollout can answer."""
    from ..finetune.config import ForecastConfig, SamplingConfig
    from ..finetune.evaluate import load_metrics
    from ..finetune.forecast import forecast

    if _done(out, "metrics.json"):
        return load_metrics(out)
    cfg = ForecastConfig(
        context_length=context_length,
        bootstrap=n_boot,
        sampling=SamplingConfig(samples=samples, max_new_tokens=max_new_tokens, seed=seed),
    )
    return forecast(hf_dir, data, out, cfg)  # validates cfg before anything runs


def baseline_stage(
    data: Path,
    out: Path,
    *,
    tasks: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    name: str = "xgboost",
    train_fraction: float = 1.0,
) -> dict:
    from ..finetune.baselines import run_baseline
    from ..finetune.evaluate import load_metrics

    if _done(out, "metrics.json"):
        return load_metrics(out)
    return run_baseline(name, data, out, tasks=tasks, n_boot=n_boot, seed=seed, train_fraction=train_fraction)


def load_cell_results(path: Path) -> dict[str, dict]:
    """Finished cells of a resumable grid (`ehrfm ablate`, `ehrfm study`): ``results.jsonl`` keyed by "cell"."""
    if not path.exists():
        return {}
    return {r["cell"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def append_cell_result(path: Path, record: dict) -> None:
    """Record one finished cell (a line of ``results.jsonl``; re-runs skip it)."""
    with open(path, "a") as stream:
        stream.write(json.dumps(record, default=str) + "\n")


def format_metric(entry: dict | None) -> str:
    """``value (low-high)`` as in 003's supplementary tables; ``n/a`` when undefined (e.g. no positives)."""
    if not entry or entry.get("value") is None or math.isnan(entry["value"]):
        return "n/a"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} ({low:.3f}-{high:.3f})"


def ci_whiskers(entry: dict | None) -> tuple[float, float, float] | None:
    """(value, lower, upper) whisker lengths of a metric entry for a plot, None when undefined; whiskers are
    clipped at 0 because a percentile CI need not contain the point estimate, and a degenerate one equals it up
    to rounding (point: scikit-learn; resamples: ``metrics.fast_binary_metrics``)."""
    if not entry or entry.get("value") is None or math.isnan(entry["value"]):
        return None
    value, low, high = entry["value"], entry.get("ci_low"), entry.get("ci_high")
    lower = max(0.0, value - low) if low is not None and not math.isnan(low) else 0.0
    upper = max(0.0, high - value) if high is not None and not math.isnan(high) else 0.0
    return value, lower, upper


def cell(metrics: dict, task: str, metric: str) -> str:
    """``format_metric`` of one task's metric in an evaluation's ``metrics.json``."""
    return format_metric(metrics["tasks"].get(task, {}).get(metric))


def results_table(results: dict[str, dict], tasks: list[str]) -> str:
    """Markdown table, one row per (task, model), columns AUROC / AUPRC / Brier with 95% CIs."""
    lines = ["| task | model | n (pos) | AUROC | AUPRC | Brier |", "|---|---|---|---|---|---|"]
    for task in tasks:
        for model, metrics in results.items():
            entry = metrics["tasks"].get(task)
            if entry is None:
                continue
            n = entry.get("n", {}).get("value")
            prevalence = entry.get("prevalence", {}).get("value")
            count = "n/a" if n is None else f"{int(n)} ({round(n * prevalence) if prevalence is not None else '?'})"
            lines.append(
                f"| {task} | {model} | {count} | " + " | ".join(cell(metrics, task, m) for m in METRICS) + " |"
            )
    return "\n".join(lines) + "\n"


class StageTimer:
    """Prints numbered stage headers and records each stage's wall time (seconds) for the report."""

    def __init__(self, total: int):
        self.total, self.index, self.seconds = total, 0, {}
        self._name, self._started = None, 0.0

    def start(self, name: str, detail: str = "") -> None:
        self.stop()
        self.index += 1
        self._name, self._started = name, time.time()
        print(f"[{self.index}/{self.total}] {name}{': ' + detail if detail else ''}", flush=True)

    def stop(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.time() - self._started, 1)
            self._name = None

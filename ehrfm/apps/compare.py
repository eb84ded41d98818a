"""`ehrfm compare --preset ehrmamba`: 001's Table 1 (EhrMamba and its baselines) on a prepared corpus.

One resumable command: every row of the preset is pretrained where the paper pretrains it, exported,
finetuned the way the paper finetunes it and evaluated on the test split, beside XGBoost on code counts; the
result is one table in 001's layout (task, then AUROC / AUPRC / F1 rows, one column per model, 95% CIs from
the patient-level bootstrap) and one PNG per metric.

Rows of the ``ehrmamba`` preset (001 section 4.2, Appendix C):

    row        backbone  pretraining  finetuning                    context (001)  epochs (001)
    XGBoost    -         -            code counts                   -              -
    LSTM       bilstm    none         from scratch, one per task    512            5
    CEHR-BERT  cehrbert  MLM          one model per task            512            5
    BigBird    bigbird   MLM          one model per task            2048           3
    MultiBird  bigbird   (BigBird's)  MPF, one model for all tasks  2048           6
    EhrMamba   mamba     NTP          MPF, one model for all tasks  2048           6

Choices where 001 does not transfer to a laptop (also in the README): every backbone uses one ``--size``
preset (``paper001`` is 001's own configurations, 768 hidden, for GPUs); ``--context-scale`` multiplies
001's context lengths, keeping their 4:1 ratio (0.25: 128 and 512); pretraining runs ``--steps`` optimiser
steps rather than 001's 15 epochs; MultiBird reuses BigBird's pretraining run (001 trains both the same way
and differs in the finetuning), on padded rows so that its long rows are block sparse. F1 is the best F1
over thresholds on the evaluated split (``best_f1``), as 001 does not state its threshold. XGBoost's CI
comes from the same bootstrap of its test predictions (001 shows 0.00 for its single run).

OUT layout: ``runs/<backbone>`` (pretraining), ``exported/<backbone>``, ``cells/<row>[/<task>]/finetune``
and ``eval``, ``results.jsonl`` (one line per finished row: re-running skips it), ``compare.md``,
``compare_<metric>.png``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from ..config_flags import comma_list

TABLE_METRICS = {"auroc": "AUROC", "auprc": "AUPRC", "best_f1": "F1-Score"}


@dataclass(frozen=True)
class Row:
    """One column of 001's Table 1: a backbone, how it is pretrained and how it is finetuned."""

    name: str
    architecture: str | None  # None: XGBoost on code counts
    pretrained: bool = True
    method: str = "per-task"  # finetune method: "per-task" or "mpf"
    separate_tasks: bool = True  # one finetuned model per task (001: all but MultiBird and EhrMamba)
    context: int = 512  # 001 Appendix C
    epochs: int = 5  # 001 Appendix C, finetuning
    pretrain_overrides: tuple[str, ...] = ()  # extra `ehrfm pretrain` key=value


# BigBird's block-sparse attention needs unpacked rows (packed rows run full attention with a document mask)
BLOCK_SPARSE = ("data.mode=padded",)

PRESETS: dict[str, tuple[Row, ...]] = {
    "ehrmamba": (
        Row("XGBoost", None),
        Row("LSTM", "bilstm", pretrained=False, context=512, epochs=5),
        Row("CEHR-BERT", "cehrbert", context=512, epochs=5),
        Row("BigBird", "bigbird", context=2048, epochs=3, pretrain_overrides=BLOCK_SPARSE),
        Row(
            "MultiBird",
            "bigbird",
            method="mpf",
            separate_tasks=False,
            context=2048,
            epochs=6,
            pretrain_overrides=BLOCK_SPARSE,
        ),
        Row("EhrMamba", "mamba", method="mpf", separate_tasks=False, context=2048, epochs=6),
    )
}


@dataclass(frozen=True)
class Settings:
    size: str = "tiny"
    steps: int = 2000
    context_scale: float = 1.0
    epochs: int | None = None  # None: each row's 001 value
    batch_size: int = 8
    n_boot: int = 1000
    seed: int = 0

    def context(self, row: Row) -> int:
        return max(16, int(round(row.context * self.context_scale)))

    def pretrain_key(self, row: Row) -> str:
        return f"{row.architecture}-{self.size}-C{self.context(row)}"


def run_rows(data: Path, out: Path, rows: tuple[Row, ...], settings: Settings, tasks: list[str]) -> list[dict]:
    """Run (or resume) every row; returns one record per row (also appended to ``out/results.jsonl``)."""
    from tqdm.auto import tqdm

    from ..outputs import claim_run_dir
    from ..pretrain.export import export_untrained
    from .pipeline import (
        PretrainSpec,
        append_cell_result,
        baseline_stage,
        export_stage,
        load_cell_results,
        pretrain_stage,
    )

    claim_run_dir(out, "compare", inputs=[data])
    results_path = out / "results.jsonl"
    done = load_cell_results(results_path)
    records = [done[r.name] for r in rows if r.name in done]
    for row in tqdm([r for r in rows if r.name not in done], desc="comparison rows", unit="row"):
        started = time.time()
        cell_dir = out / "cells" / row.name
        if row.architecture is None:
            metrics = baseline_stage(data, cell_dir / "eval", tasks=tasks, n_boot=settings.n_boot, seed=settings.seed)
        else:
            key = settings.pretrain_key(row)
            hf_dir = out / "exported" / key
            if not row.pretrained:
                if not (hf_dir / "ehrfm_export.json").exists():
                    export_untrained(row.architecture, settings.size, data, hf_dir, seed=settings.seed)
            else:
                spec = PretrainSpec(
                    architecture=row.architecture,
                    size=settings.size,
                    steps=settings.steps,
                    context_length=settings.context(row),
                    batch_size=settings.batch_size,
                    overrides=[f"train.seed={settings.seed}", *row.pretrain_overrides],
                )
                pretrain_stage(data, out / "runs" / key, spec, quiet=True)
                export_stage(out / "runs" / key, hf_dir)
            metrics = _finetune_and_evaluate(row, hf_dir, data, cell_dir, settings, tasks)
        record = {
            "cell": row.name,
            "architecture": row.architecture,
            "pretrained": row.pretrained if row.architecture else None,
            "method": row.method if row.architecture else "xgboost",
            "separate_tasks": row.separate_tasks,
            "context": settings.context(row) if row.architecture else None,
            "size": settings.size if row.architecture else None,
            "seconds": round(time.time() - started, 1),
            "tasks": metrics["tasks"],
        }
        append_cell_result(results_path, record)
        records.append(record)
    order = [r.name for r in rows]
    return sorted(records, key=lambda r: order.index(r["cell"]) if r["cell"] in order else len(order))


def _finetune_and_evaluate(row: Row, hf_dir: Path, data: Path, cell_dir: Path, settings: Settings, tasks: list[str]):
    """Finetune ``row`` (one model per task, or one MPF model for all) and evaluate on the test split; the
    per-task evaluations are merged into one ``{"tasks": {...}}``."""
    from .pipeline import evaluate_stage, finetune_stage

    groups = [[t] for t in tasks] if row.separate_tasks else [list(tasks)]
    merged: dict = {"tasks": {}}
    for group in groups:
        folder = cell_dir / group[0] if row.separate_tasks else cell_dir
        ft = finetune_stage(
            hf_dir,
            data,
            folder / "finetune",
            method=row.method,
            tasks=group,
            epochs=settings.epochs or row.epochs,
            context_length=settings.context(row),
            seed=settings.seed,
            init="pretrained" if row.pretrained else "random",
        )
        metrics = evaluate_stage(ft, data, folder / "eval", n_boot=settings.n_boot, seed=settings.seed)
        merged["tasks"].update({t: metrics["tasks"][t] for t in group if t in metrics["tasks"]})
    return merged


def compare_table(records: list[dict], tasks: list[str], header: str) -> str:
    """001's Table 1 layout: per task a title row, then one row per metric; one column per model."""
    from .pipeline import format_metric

    names = [r["cell"] for r in records]
    lines = [header, "", "| Metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task in tasks:
        lines.append(f"| **{task}** |" + " |" * len(names))
        for key, label in TABLE_METRICS.items():
            cells = [format_metric(r["tasks"].get(task, {}).get(key)) for r in records]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    details = [
        f"{r['cell']}: "
        + (
            "code counts"
            if r["architecture"] is None
            else f"{r['architecture']}-{r['size']}, C={r['context']}, "
            f"{'pretrained' if r['pretrained'] else 'from scratch'}, {r['method']}"
            f"{', one model per task' if r['separate_tasks'] else ', one model for all tasks'}"
        )
        + f" ({r['seconds']:.0f} s)"
        for r in records
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {d}" for d in details) + "\n"


def compare_plots(records: list[dict], tasks: list[str], folder: Path) -> list[Path]:
    """One PNG per metric: grouped bars (one group per task, one bar per model) with 95% CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..outputs import save_figure_atomic
    from .pipeline import ci_whiskers

    written = []
    width = 0.8 / max(len(records), 1)
    for key, label in TABLE_METRICS.items():
        fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(tasks), 4.4))
        for i, record in enumerate(records):
            xs, ys, err_lo, err_hi = [], [], [], []
            for t, task in enumerate(tasks):
                whiskers = ci_whiskers(record["tasks"].get(task, {}).get(key))
                if whiskers is None:
                    continue
                xs.append(t + (i - (len(records) - 1) / 2) * width)
                ys.append(whiskers[0])
                err_lo.append(whiskers[1])
                err_hi.append(whiskers[2])
            ax.bar(xs, ys, width, yerr=[err_lo, err_hi], capsize=2, label=record["cell"])
        if key == "auroc":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8, label="chance")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(label)
        ax.set_ylim(0, 1)
        # below the axes: inside, the legend hid the tallest bars
        ax.legend(fontsize=7, ncol=min(len(records) + 1, 4), loc="upper center", bbox_to_anchor=(0.5, -0.12))
        ax.set_title(f"001 comparison: {label} (95% CI)")
        fig.tight_layout()
        written.append(save_figure_atomic(fig, folder / f"compare_{key}.png"))
    return written


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="a paper's comparison table on a prepared corpus (001: EhrMamba and its baselines)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="ehrmamba")
    p.add_argument("--data", type=Path, required=True, help="prepared data folder (ehrfm prepare)")
    p.add_argument("--out", type=Path, required=True, help="comparison folder (re-running resumes)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task with labels)")
    p.add_argument("--rows", default=None, help="comma-separated subset of the preset's rows (default: all)")
    p.add_argument("--size", default="tiny", help="model preset of every backbone (see `ehrfm models`)")
    p.add_argument("--steps", type=int, default=2000, help="pretraining steps per backbone")
    p.add_argument("--context-scale", type=float, default=1.0, help="multiplies 001's context lengths")
    p.add_argument("--epochs", type=int, default=None, help="finetuning epochs of every row (default: 001's)")
    p.add_argument("--batch-size", type=int, default=8, help="pretraining rows per step")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..data_shards.shards import read_manifest, write_text_atomic

    rows = PRESETS[args.preset]
    if args.rows:
        chosen = comma_list(args.rows)
        unknown = [r for r in chosen if r not in {row.name for row in rows}]
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; the {args.preset} preset has {[r.name for r in rows]}")
        rows = tuple(r for r in rows if r.name in chosen)
    if args.context_scale <= 0:
        raise SystemExit(f"--context-scale must be > 0, got {args.context_scale}")
    manifest = read_manifest(args.data)
    tasks = comma_list(args.tasks) or [t for t, info in manifest["tasks"].items() if info["labels"] > 0]
    settings = Settings(
        size=args.size,
        steps=args.steps,
        context_scale=args.context_scale,
        epochs=args.epochs,
        batch_size=args.batch_size,
        n_boot=args.bootstrap,
        seed=args.seed,
    )
    started = time.time()
    records = run_rows(args.data, args.out, rows, settings, tasks)
    header = (
        f"# ehrfm compare --preset {args.preset}\n\n{manifest['counts']['patients_total']} patients in {args.data}; "
        f"test split; 95% CIs from {args.bootstrap} patient-level bootstrap resamples; {args.steps} pretraining "
        f"steps, context x{args.context_scale:g} of 001's"
    )
    table = compare_table(records, tasks, header)
    write_text_atomic(args.out / "compare.md", table)
    plots = compare_plots(records, tasks, args.out)
    print(table)
    print(f"wrote {args.out / 'compare.md'} and {len(plots)} plots in {time.time() - started:.0f} s")
    return 0

"""`ehrfm ablate`: the 003 ablation study (RQ1-RQ4) as one resumable command.

Design (003 section 4.1): one axis varies at a time around a base setting (003's gray rows: vocabulary b=10,
i=3, full history "cutoff", every concept group, all training data, and the base context/size), for every
backbone (003's columns: BERT and ModernBERT pretrained with MLM 0.15, XLNet with permutation LM, Llama, Mamba
and Mamba2 with next-token prediction), plus XGBoost on code counts for every data variant. Axes and values:

    vocabulary      b5-i3 b10-i3 b5-i4 b10-i4        value bins b, ICD-10 level i (prepare: vocab.*)
    context-size    C128..C512 x tiny/small/medium   pretraining and finetuning context, model size
    history         cutoff trunc-0 trunc-1y trunc-3y agg-1d agg-2d   (prepare: history.lookback/aggregate_days)
    concepts        DX +VIT +LAB +MED +PRO           cumulative concept groups (prepare: history.concept_groups)
    train-fraction  25 50 75 100                     % of finetuning patients (finetune: train_fraction)

Choices where 003 is silent or does not transfer (also in the README):
- ICD level i only changes ICD-coded diagnoses; Synthea codes diagnoses in SNOMED, so on Synthea the i=3/i=4
  rows share a vocabulary (the table says so in the vocabulary column).
- Downstream models are MPF-finetuned (001) from the pretrained backbone, one model for all tasks.
- XGBoost is trained on each data variant's full finetuning split; it has no context, size or fraction.

Everything lands in OUT: prepared variants (data/<variant>), pretraining runs (runs/<key>) and their exports (exported/<key>),
finetuned models and evaluations (cells/<experiment>: the base setting, listed under every axis, is one
experiment per model), ``results.jsonl`` (one line per finished cell: re-running skips them), ``ablation.md`` (003 supplementary-table layout: value (95% CI) per metric, task and axis
value x model) and one PNG per axis and metric.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from ..config_flags import comma_list

BACKBONES = ("bert", "xlnet", "modernbert", "llama", "mamba", "mamba2")  # 003's column order
CONCEPT_ORDER = ("DX", "VIT", "LAB", "MED", "PRO")
ALWAYS_KEPT_GROUPS = ["IMM", "OTHER"]  # demographics and other events are kept in every concept variant
HISTORY = {
    "cutoff": {"history.lookback": "all"},
    "trunc-0": {"history.lookback": "latest_visit"},
    "trunc-1y": {"history.lookback": "1y"},
    "trunc-3y": {"history.lookback": "3y"},
    "agg-1d": {"history.aggregate_days": 1.0},
    "agg-2d": {"history.aggregate_days": 2.0},
}
VOCABULARY = {
    "b5-i3": {"vocab.num_bins": 5, "vocab.icd_level": 3},
    "b10-i3": {"vocab.num_bins": 10, "vocab.icd_level": 3},
    "b5-i4": {"vocab.num_bins": 5, "vocab.icd_level": 4},
    "b10-i4": {"vocab.num_bins": 10, "vocab.icd_level": 4},
}


@dataclass(frozen=True)
class Grid:
    backbones: tuple[str, ...]
    vocabulary: tuple[str, ...]
    context_size: tuple[tuple[int, str], ...]
    history: tuple[str, ...]
    concepts: tuple[str, ...]  # cumulative: "DX", "+VIT", ...
    train_fraction: tuple[float, ...]
    base_context: int
    base_size: str
    steps: int
    epochs: int


def full_grid(steps: int, epochs: int) -> Grid:
    return Grid(
        backbones=BACKBONES,
        vocabulary=tuple(VOCABULARY),
        context_size=tuple((c, s) for c in (128, 256, 512) for s in ("tiny", "small", "medium")),
        history=tuple(HISTORY),
        concepts=("DX", "+VIT", "+LAB", "+MED", "+PRO"),
        train_fraction=(0.25, 0.5, 0.75, 1.0),
        base_context=512,
        base_size="medium",
        steps=steps,
        epochs=epochs,
    )


def quick_grid(steps: int, epochs: int) -> Grid:
    """Two values per axis, Tiny models at C=128: about 20 minutes on a 2-core laptop with 150 patients."""
    return Grid(
        backbones=("llama", "mamba"),
        vocabulary=("b5-i3", "b10-i3"),
        context_size=((128, "tiny"), (256, "tiny")),
        history=("cutoff", "trunc-1y"),
        concepts=("DX", "+PRO"),
        train_fraction=(0.5, 1.0),
        base_context=128,
        base_size="tiny",
        steps=steps,
        epochs=epochs,
    )


BASE_VALUES = {"vocabulary": "b10-i3", "history": "cutoff", "concepts": "+PRO", "train-fraction": "100%"}


def base_only(grid: Grid) -> Grid:
    """``grid`` restricted to its base setting (``--base-only``): one experiment per backbone plus XGBoost, listed
    under every axis as usual; e.g. a first cell for a new backbone."""
    return replace(
        grid,
        vocabulary=(BASE_VALUES["vocabulary"],),
        context_size=((grid.base_context, grid.base_size),),
        history=(BASE_VALUES["history"],),
        concepts=(BASE_VALUES["concepts"],),
        train_fraction=(1.0,),
    )


def concept_groups(label: str) -> list[str]:
    name = label.lstrip("+")
    return list(CONCEPT_ORDER[: CONCEPT_ORDER.index(name) + 1]) + ALWAYS_KEPT_GROUPS


@dataclass(frozen=True)
class Cell:
    """One (axis, value, model) point: a data variant, a pretraining key and a finetuning setting."""

    axis: str
    value: str
    model: str  # a backbone or "xgboost"
    data_variant: str
    prepare_overrides: tuple[tuple[str, object], ...]
    context: int
    size: str
    train_fraction: float

    @property
    def name(self) -> str:
        return f"{self.axis}={self.value}/{self.model}"

    @property
    def experiment_key(self) -> str:
        """Folder name of the experiment; base cells listed under several axes share one (run once)."""
        if self.model == "xgboost":
            return f"{self.data_variant}__xgboost"
        return f"{self.pretrain_key}-f{round(self.train_fraction * 100)}"

    @property
    def pretrain_key(self) -> str:
        return f"{self.data_variant}__{self.model}-{self.size}-C{self.context}"


def _variant(vocab: str = "b10-i3", history: str = "cutoff", concepts: str = "+PRO") -> tuple[str, tuple]:
    overrides = {**VOCABULARY[vocab], **HISTORY[history], "history.concept_groups": concept_groups(concepts)}
    name = f"{vocab}_{history}_{concepts.lstrip('+')}"
    return name, tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in overrides.items()))


def cells(grid: Grid) -> list[Cell]:
    """Every cell of the grid, base cells repeated under each axis (they share runs, so cost nothing twice)."""
    out = []
    models = list(grid.backbones) + ["xgboost"]
    base_data = _variant()

    def add(axis, value, data, context, size, fraction, model_list):
        for model in model_list:
            out.append(Cell(axis, value, model, data[0], data[1], context, size, fraction))

    for vocab in grid.vocabulary:
        add("vocabulary", vocab, _variant(vocab=vocab), grid.base_context, grid.base_size, 1.0, models)
    for i, (context, size) in enumerate(grid.context_size):  # XGBoost has neither: shown once
        add(
            "context-size",
            f"C{context}-{size}",
            base_data,
            context,
            size,
            1.0,
            list(grid.backbones) + (["xgboost"] if i == 0 else []),
        )
    for history in grid.history:
        add("history", history, _variant(history=history), grid.base_context, grid.base_size, 1.0, models)
    for concepts in grid.concepts:
        add("concepts", concepts, _variant(concepts=concepts), grid.base_context, grid.base_size, 1.0, models)
    for fraction in grid.train_fraction:
        add(
            "train-fraction",
            f"{round(fraction * 100)}%",
            base_data,
            grid.base_context,
            grid.base_size,
            fraction,
            list(grid.backbones) + (["xgboost"] if fraction == 1.0 else []),
        )
    return out


def _prepare_variant(
    source: Path, fmt: str, folder: Path, overrides: tuple, tasks: list[str], user_options: list[str]
) -> Path:
    from ..config import load_config
    from ..data_shards.config import PrepareConfig
    from ..data_shards.prepare import prepare

    if (folder / "manifest.json").exists():
        return folder
    # the variant's dotted PrepareConfig fields (e.g. history.lookback) win over the user's options
    variant = [f"{key}={','.join(value) if isinstance(value, tuple) else value}" for key, value in overrides]
    cfg = load_config(PrepareConfig, None, [f"format={fmt}", *user_options, *variant])
    cfg.tasks = list(tasks)
    prepare(source, folder, cfg, progress=False)
    return folder


def run_grid(
    source: Path,
    fmt: str,
    out: Path,
    grid: Grid,
    *,
    task_sets: list[str],
    tasks: list[str] | None,
    n_boot: int,
    jobs: int = 1,
    seed: int = 0,
    prepare_options: list[str] | None = None,
) -> list[dict]:
    """Run (or resume) every cell; returns one record per cell (also appended to ``out/results.jsonl``)."""
    from tqdm.auto import tqdm

    from ..data_shards.shards import read_manifest
    from ..outputs import claim_run_dir
    from .pipeline import (
        PretrainSpec,
        append_cell_result,
        baseline_stage,
        dropping_one_class_tasks,
        evaluate_stage,
        export_stage,
        finetune_stage,
        load_cell_results,
        pretrain_stage,
    )

    claim_run_dir(out, "ablate", inputs=[source])  # a new, empty or earlier ablation folder (resumes)
    results_path = out / "results.jsonl"
    done = load_cell_results(results_path)
    every_cell = cells(grid)
    todo = [c for c in every_cell if c.name not in done]
    variants = {c.data_variant: c.prepare_overrides for c in every_cell}
    for name, overrides in tqdm(sorted(variants.items()), desc="prepare variants", unit="variant"):
        _prepare_variant(source, fmt, out / "data" / name, overrides, task_sets, list(prepare_options or []))
    if tasks is None:
        manifest = read_manifest(out / "data" / _variant()[0])
        tasks = [t for t, info in manifest["tasks"].items() if info["labels"] > 0]

    # pretraining: independent subprocesses, `jobs` at a time
    specs = {}
    for c in todo:
        if c.model != "xgboost":
            specs[c.pretrain_key] = (
                c.data_variant,
                PretrainSpec(
                    architecture=c.model,
                    size=c.size,
                    steps=grid.steps,
                    context_length=c.context,
                    overrides=[f"train.seed={seed}"],
                ),
            )
    runs = out / "runs"
    exported = out / "exported"

    def pretrain(item):
        key, (variant, spec) = item
        pretrain_stage(out / "data" / variant, runs / key, spec, quiet=True)
        export_stage(runs / key, exported / key)  # beside the run: an output may not sit inside its input
        return key

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        for _ in tqdm(pool.map(pretrain, sorted(specs.items())), total=len(specs), desc="pretrain runs", unit="run"):
            pass

    records = list(done.values())
    for c in tqdm(todo, desc="ablation cells", unit="cell"):
        started = time.time()
        data = out / "data" / c.data_variant
        cell_dir = out / "cells" / c.experiment_key
        skipped = {}
        if c.model == "xgboost":
            metrics = baseline_stage(data, cell_dir / "eval", tasks=tasks, n_boot=n_boot, seed=seed)
        else:  # a task a variant leaves without both classes (e.g. a small fraction) is dropped, not fatal
            ft, skipped = dropping_one_class_tasks(
                lambda kept: finetune_stage(
                    exported / c.pretrain_key,
                    data,
                    cell_dir / "finetune",
                    method="mpf",
                    tasks=kept,
                    epochs=grid.epochs,
                    context_length=c.context,
                    train_fraction=c.train_fraction,
                    seed=seed,
                ),
                tasks,
                c.name,
            )
            metrics = evaluate_stage(ft, data, cell_dir / "eval", n_boot=n_boot, seed=seed)
        record = {
            "cell": c.name,
            "axis": c.axis,
            "value": c.value,
            "model": c.model,
            "data_variant": c.data_variant,
            "context": c.context,
            "size": c.size,
            "train_fraction": c.train_fraction,
            "vocab_size": read_manifest(data)["vocab_size"],
            "seconds": round(time.time() - started, 1),
            "tasks": metrics["tasks"],
            "skipped_tasks": skipped,
        }
        append_cell_result(results_path, record)
        records.append(record)
    return records


def _entry_text(entry: dict | None, metric: str) -> str:
    from .pipeline import format_metric

    return "-" if entry is None else format_metric(entry.get(metric))


def ablation_tables(records: list[dict], grid: Grid) -> str:
    """003 supplementary-table layout: per axis and metric, rows (task, axis value), columns the models."""
    models = ["xgboost"] + list(grid.backbones)
    tasks = sorted({t for r in records for t in r["tasks"]})
    axes = ["vocabulary", "context-size", "history", "concepts", "train-fraction"]
    base = dict(BASE_VALUES, **{"context-size": f"C{grid.base_context}-{grid.base_size}"})
    lines = [
        "# ehrfm ablation (003 protocol)",
        "",
        "value (95% CI, patient-level bootstrap) on the test split; * marks the base setting shared by all axes "
        "(003's gray rows); - = not applicable, or a task the variant left with one class in training "
        "(listed under the tables).",
        "",
    ]
    for axis in axes:
        rows = [r for r in records if r["axis"] == axis]
        if not rows:
            continue
        values = list(dict.fromkeys(r["value"] for r in rows))
        for metric in ("auprc", "auroc", "brier"):
            lines += [
                f"## {axis}: {metric.upper()}",
                "",
                f"| task | {axis} | vocab | " + " | ".join(models) + " |",
                "|---|---|---|" + "---|" * len(models),
            ]
            for task in tasks:
                for value in values:
                    by_model = {r["model"]: r for r in rows if r["value"] == value}
                    vocab = next(iter(by_model.values()))["vocab_size"]
                    mark = "*" if value == base.get(axis) else ""
                    cells_ = [
                        _entry_text(by_model[m]["tasks"].get(task) if m in by_model else None, metric) for m in models
                    ]
                    lines.append(f"| {task} | {value}{mark} | {vocab} | " + " | ".join(cells_) + " |")
            lines.append("")
    dropped = [(r["cell"], task, reason) for r in records for task, reason in r.get("skipped_tasks", {}).items()]
    if dropped:
        lines += ["## tasks dropped from a cell", ""] + [f"- {cell}: {reason}" for cell, _, reason in dropped] + [""]
    return "\n".join(lines)


def ablation_plots(records: list[dict], folder: Path) -> list[Path]:
    """One PNG per axis and metric: a panel per task, axis values on x, one line per model with CI bars."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..outputs import save_figure_atomic
    from .pipeline import ci_whiskers

    written = []
    tasks = sorted({t for r in records for t in r["tasks"]})
    for axis in dict.fromkeys(r["axis"] for r in records):
        rows = [r for r in records if r["axis"] == axis]
        values = list(dict.fromkeys(r["value"] for r in rows))
        for metric in ("auprc", "auroc", "brier"):
            fig, panels = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
            for ax, task in zip(panels[0], tasks):
                for offset, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
                    xs, ys, lo, hi = [], [], [], []
                    for i, value in enumerate(values):
                        r = next((r for r in rows if r["value"] == value and r["model"] == model), None)
                        whiskers = ci_whiskers(r["tasks"].get(task, {}).get(metric) if r else None)
                        if whiskers is None:
                            continue
                        xs.append(i + 0.06 * offset)
                        ys.append(whiskers[0])
                        lo.append(whiskers[1])
                        hi.append(whiskers[2])
                    if xs:
                        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=model)
                ax.set_xticks(range(len(values)), values, rotation=30, ha="right", fontsize=8)
                ax.set_title(task, fontsize=9)
                ax.set_ylabel(metric.upper() + (" (lower is better)" if metric == "brier" else ""))
            for ax in panels[0]:  # one legend, on the first panel that has lines
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
                    break
            fig.suptitle(f"ablation of {axis}")
            fig.tight_layout()
            written.append(save_figure_atomic(fig, folder / f"ablation_{axis}_{metric}.png"))
    return written


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate",
        help="the 003 ablation study as one resumable command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", type=Path, default=None, help="MEDS folder or FHIR bundles (default: a Synthea cohort)")
    p.add_argument("--format", choices=["meds", "fhir"], default="fhir")
    p.add_argument("--patients", type=int, default=150, help="Synthea cohort size when --input is not given")
    p.add_argument("--seed", type=int, default=7, help="Synthea seed")
    p.add_argument("--age", default="50-90")
    p.add_argument("--task-sets", default="demo", help="task configs for prepare (default: demo)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: every task with labels)")
    p.add_argument("--out", type=Path, default=Path("ehrfm-ablation"))
    p.add_argument("--quick", action="store_true", help="two values per axis, Llama + Mamba, Tiny at C=128")
    p.add_argument("--backbones", default=None, help=f"comma-separated subset of {','.join(BACKBONES)}")
    p.add_argument(
        "--base-only",
        action="store_true",
        help="only the base setting: one experiment per backbone + XGBoost (no axis varies)",
    )
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per run (default 40 quick, 2000 full)")
    p.add_argument("--epochs", type=int, default=None, help="finetuning epochs (default 2 quick, 10 full)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=1, help="pretraining runs in parallel (one process each)")
    p.add_argument(
        "--prepare-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="PrepareConfig override shared by every data variant, repeatable (e.g. splits.test=0.3)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..data_shards.shards import write_text_atomic
    from ..data_shards.synthea import generate_cohort

    started = time.time()
    if args.quick:
        grid = quick_grid(args.steps or 40, args.epochs or 2)
    else:
        grid = full_grid(args.steps or 2000, args.epochs or 10)
    if args.backbones:
        chosen = tuple(comma_list(args.backbones))
        unknown = [b for b in chosen if b not in BACKBONES]
        if unknown:
            raise SystemExit(f"--backbones: unknown {unknown}; choose from {list(BACKBONES)}")
        grid = replace(grid, backbones=chosen)
    if args.base_only:
        grid = base_only(grid)
    if args.input is None:
        source, fmt = generate_cohort(args.patients, seed=args.seed, age=args.age), "fhir"
    else:
        source, fmt = args.input, args.format
    tasks = comma_list(args.tasks) or None
    records = run_grid(
        source,
        fmt,
        args.out,
        grid,
        task_sets=comma_list(args.task_sets),
        tasks=tasks,
        n_boot=args.bootstrap,
        jobs=args.jobs,
        prepare_options=args.prepare_option,
    )
    table = ablation_tables(records, grid)
    write_text_atomic(args.out / "ablation.md", table)
    plots = ablation_plots(records, args.out)
    print(table)
    print(
        f"{len(records)} cells, table {args.out / 'ablation.md'}, {len(plots)} plots in {args.out} "
        f"({time.time() - started:.0f} s)"
    )
    return 0

"""`ehrfm study`: measured studies that back the framework's claims, each one resumable command.

    ehrfm study convergence --data DATA --out OUT [--models llama,mamba,mamba2,bert] [--size tiny] [--steps N]
        Pretrain each backbone with the same recipe on one prepared folder; writes ``convergence.md`` (final
        and best validation perplexity, perplexity on clinical-code targets, the unigram/bigram references, the
        first step below the bigram, wall time) and ``convergence.png`` (val ppl vs step with the reference
        lines, one panel per backbone).

    ehrfm study pretraining-benefit [--patients 1000 | --input DIR] --out OUT [--fractions 0.1,0.25,0.5,1]
        Does pretraining pay (001/003's sample-efficiency claim)? Pretrain and export one backbone, then for each
        fraction of the finetune split's patients finetune (a) the pretrained model, (b) the same architecture
        from random weights (the control), and fit (c) XGBoost on code counts on the same patients; evaluate
        all on the test split (AUROC, AUPRC with patient-level bootstrap CIs). Writes ``results.jsonl`` (one
        line per finished cell; re-running skips them), ``pretraining_benefit.md`` and one PNG per metric
        (x: fraction of training patients, one line per model, 95% CI bands).

Choices (also in the README): every cell uses the same finetuning recipe (MPF over the study's tasks, the
same epochs, learning rate and seed) for the pretrained and the from-scratch model; the subsample of
patients is drawn once per fraction (seeded) and shared by the three models; a task that a fraction leaves
with one class in training is dropped from that cell and listed under the table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ..config_flags import comma_list
from ..pretrain.config import SIZE_NAMES

STUDY_TASKS = ("los_7d", "readmission_30d")
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
MODELS = ("pretrained", "from scratch", "xgboost")
METRICS = ("auroc", "auprc")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(comma_list(text, float))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return values


def _add_recipe_arguments(p: argparse.ArgumentParser, *, steps: int) -> None:
    """Pretraining flags shared by the studies (the recipe of the pretraining runs)."""
    p.add_argument("--size", choices=SIZE_NAMES, default="mini")
    p.add_argument("--steps", type=int, default=steps, help=f"pretraining steps (default {steps})")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="pretraining peak learning rate (default 3e-3)")
    p.add_argument(
        "--pretrain-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="PretrainConfig override for every pretraining run, repeatable (e.g. optim.warmup_fraction=0.05)",
    )


def _spec(args: argparse.Namespace, architecture: str):
    from .pipeline import PretrainSpec

    return PretrainSpec(
        architecture=architecture,
        size=args.size,
        steps=args.steps,
        context_length=args.context_length,
        batch_size=args.batch_size,
        overrides=[f"optim.lr={args.lr}", *args.pretrain_option],
    )


# -- convergence ------------------------------------------------------------------------------------------
def convergence_rows(runs: dict[str, Path]) -> list[dict]:
    """One summary per run: last and best val ppl, code ppl, references, first step below the bigram."""
    from ..pretrain.curves import crossing_step, validation_records

    rows = []
    for label, run in runs.items():
        records = validation_records(run)
        if not records:
            continue
        last = records[-1]
        rows.append(
            {
                "run": label,
                "steps": last["step"],
                "val_ppl": last["val_ppl"],
                "best_val_ppl": min(r["val_ppl"] for r in records),
                "val_code_ppl": last.get("val_code_ppl"),
                "ref_unigram_ppl": last.get("ref_unigram_ppl"),
                "ref_bigram_ppl": last.get("ref_bigram_ppl"),
                "ref_code_unigram_ppl": last.get("ref_code_unigram_ppl"),
                "ref_code_bigram_ppl": last.get("ref_code_bigram_ppl"),
                "first_step_below_bigram": crossing_step(records),
                "seconds": _run_seconds(run),
            }
        )
    return rows


def _run_seconds(run: Path) -> float | None:
    from ..metrics_log import read_metrics

    times = [r["step_time_s"] for r in read_metrics(run) if "step_time_s" in r]
    return round(sum(times), 1) if times else None


def _num(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def convergence_table(rows: list[dict]) -> str:
    lines = [
        "| run | steps | val ppl (last) | best | codes: val ppl | unigram | bigram | codes: unigram | codes: bigram "
        "| first step below bigram | train s |",
        "|---|" + "---|" * 10,
    ]
    for r in rows:
        crossed = r["first_step_below_bigram"]
        crossed = crossed if crossed is not None else ("never" if r["ref_bigram_ppl"] is not None else "-")
        lines.append(
            f"| {r['run']} | {r['steps']} | {_num(r['val_ppl'])} | {_num(r['best_val_ppl'])} | {_num(r['val_code_ppl'])} "
            f"| {_num(r['ref_unigram_ppl'])} | {_num(r['ref_bigram_ppl'])} | {_num(r['ref_code_unigram_ppl'])} "
            f"| {_num(r['ref_code_bigram_ppl'])} | {crossed} | {_num(r['seconds'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def run_convergence(args: argparse.Namespace) -> int:
    from ..outputs import claim_run_dir, write_json_atomic, write_text_atomic
    from ..pretrain.config import ARCHITECTURE_NAMES
    from ..pretrain.curves import plot_validation_curves
    from .pipeline import pretrain_stage

    models = comma_list(args.models)
    unknown = [m for m in models if m not in ARCHITECTURE_NAMES]
    if unknown or not models:
        raise SystemExit(f"--models: choose among {', '.join(ARCHITECTURE_NAMES)} (got {args.models!r})")
    out = args.out
    claim_run_dir(out, "study convergence", inputs=[args.data])
    runs = {}
    for i, arch in enumerate(models, 1):
        run = out / "runs" / arch
        print(f"[{i}/{len(models)}] pretrain {arch}-{args.size}: {args.steps} steps -> {run}", flush=True)
        pretrain_stage(args.data, run, _spec(args, arch), quiet=True)
        runs[f"{arch}-{args.size}"] = run
    rows = convergence_rows(runs)
    recipe = f"{args.size}, {args.steps} steps of {args.batch_size} x {args.context_length} tokens, lr {args.lr}" + (
        ", " + ", ".join(args.pretrain_option) if args.pretrain_option else ""
    )
    table = f"# ehrfm convergence study\n\ndata {args.data}; recipe: {recipe}\n\n" + convergence_table(rows)
    write_text_atomic(out / "convergence.md", table)
    write_json_atomic(out / "convergence.json", {"recipe": recipe, "rows": rows})
    png = plot_validation_curves(runs, out / "convergence.png", title=f"validation perplexity ({recipe})")
    print(table)
    print(f"table {out / 'convergence.md'}, curves {png}")
    return 0


# -- pretraining benefit ----------------------------------------------------------------------------------
def cell_key(model: str, fraction: float) -> str:
    return f"{model.replace(' ', '-')}-f{round(fraction * 100)}"


def benefit_table(records: list[dict], tasks: list[str]) -> str:
    """Per metric: rows (task, fraction), columns the three models, value (95% CI)."""
    from .pipeline import format_metric

    fractions = sorted({r["fraction"] for r in records})
    lines = []
    for metric in METRICS:
        lines += [
            f"## {metric.upper()}",
            "",
            "| task | fraction | train patients | " + " | ".join(MODELS) + " |",
            "|---|---|---|" + "---|" * len(MODELS),
        ]
        for task in tasks:
            for fraction in fractions:
                by_model = {r["model"]: r for r in records if r["fraction"] == fraction}
                patients = next((r.get("train_patients") for r in by_model.values() if r.get("train_patients")), None)
                cells = [
                    format_metric(by_model[m]["tasks"].get(task, {}).get(metric)) if m in by_model else "-"
                    for m in MODELS
                ]
                lines.append(f"| {task} | {round(fraction * 100)}% | {patients or '-'} | " + " | ".join(cells) + " |")
        lines.append("")
    dropped = [(r["cell"], reason) for r in records for reason in r.get("skipped_tasks", {}).values()]
    if dropped:
        lines += (
            ["tasks dropped from a cell (one class in training):", ""] + [f"- {c}: {why}" for c, why in dropped] + [""]
        )
    return "\n".join(lines)


def benefit_plots(records: list[dict], tasks: list[str], folder: Path) -> list[Path]:
    """One PNG per metric: a panel per task, x the fraction of training patients, a line per model with its
    95% CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..outputs import save_figure_atomic

    written = []
    for metric in METRICS:
        fig, panels = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(panels[0], tasks):
            for model in MODELS:
                points = []
                for r in sorted((r for r in records if r["model"] == model), key=lambda r: r["fraction"]):
                    m = r["tasks"].get(task, {}).get(metric)
                    if m and m.get("value") is not None and not math.isnan(m["value"]):
                        points.append((r["fraction"], m["value"], m.get("ci_low"), m.get("ci_high")))
                if not points:
                    continue
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                line = ax.plot(xs, ys, marker="o", label=model)[0]
                if all(p[2] is not None and p[3] is not None for p in points):
                    ax.fill_between(
                        xs, [p[2] for p in points], [p[3] for p in points], color=line.get_color(), alpha=0.15
                    )
            if metric == "auroc":
                ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle=":")
            ax.set_xscale("log")
            ax.minorticks_off()  # only the fractions themselves are labelled
            fractions = sorted({r["fraction"] for r in records})
            ax.set_xticks(fractions, [f"{round(f * 100)}%" for f in fractions])
            ax.set_xlabel("fraction of finetune-split patients")
            ax.set_ylabel(metric.upper())
            ax.set_title(task, fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"pretraining benefit: {metric.upper()} (test split, 95% bootstrap CI)", fontsize=10)
        fig.tight_layout()
        written.append(save_figure_atomic(fig, folder / f"pretraining_benefit_{metric}.png"))
    return written


def _train_patients(data: Path, tasks: list[str], fraction: float, seed: int) -> int:
    from ..data_shards.examples import TaskExamples
    from ..finetune.data import TRAIN_SPLIT, sample_subjects
    from ..seeding import derive_seed

    subjects = [TaskExamples(data, t, TRAIN_SPLIT, context_length=None).labels["subject_id"].to_numpy() for t in tasks]
    return len(sample_subjects(subjects, fraction, derive_seed(seed, "train_fraction")))


def run_benefit(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data_shards.config import PrepareConfig
    from ..data_shards.prepare import prepare
    from ..data_shards.shards import read_manifest
    from ..data_shards.synthea import generate_cohort
    from ..outputs import claim_run_dir, write_text_atomic
    from .pipeline import (
        StageTimer,
        append_cell_result,
        baseline_stage,
        dropping_one_class_tasks,
        evaluate_stage,
        export_stage,
        finetune_stage,
        load_cell_results,
        pretrain_stage,
    )

    started = time.time()
    out = args.out
    claim_run_dir(out, "study pretraining-benefit", inputs=[args.input])
    cells = [(model, f) for f in args.fractions for model in MODELS]
    timer = StageTimer(total=4 + len(cells))
    if args.input is None:
        timer.start("cohort", f"Synthea, {args.patients} patients, seed {args.seed}, ages {args.age} (cached)")
        source, fmt = generate_cohort(args.patients, seed=args.seed, age=args.age), "fhir"
    else:
        timer.start("cohort", f"your data: {args.input} ({args.format})")
        source, fmt = args.input, args.format
    data = out / "data"
    timer.start("prepare", f"{source} -> {data}")
    if not (data / "manifest.json").exists():
        cfg = load_config(PrepareConfig, None, [f"format={fmt}", *args.prepare_option])
        cfg.tasks = ["demo"] if args.input is None else comma_list(args.task_sets)
        prepare(source, data, cfg)
    manifest = read_manifest(data)
    tasks = comma_list(args.tasks)
    missing = [t for t in tasks if t not in manifest["tasks"]]
    if missing:
        raise SystemExit(f"--tasks: {missing} not in {data / 'manifest.json'} (has {sorted(manifest['tasks'])})")
    run, hf = out / "pretrain", out / "hf"
    timer.start("pretrain", f"{args.model}-{args.size}, {args.steps} steps -> {run}")
    pretrain_stage(data, run, _spec(args, args.model))
    timer.start("export", str(hf))
    export_stage(run, hf)

    results_path = out / "results.jsonl"
    done = load_cell_results(results_path)
    for model, fraction in cells:
        key = cell_key(model, fraction)
        timer.start(key, f"{model} on {round(fraction * 100)}% of the finetune split's patients")
        if key in done:
            continue
        cell, skipped = out / "cells" / key, {}
        if model == "xgboost":
            metrics, skipped = dropping_one_class_tasks(
                lambda kept: baseline_stage(
                    data,
                    cell / "eval",
                    tasks=kept,
                    n_boot=args.bootstrap,
                    seed=args.finetune_seed,
                    train_fraction=fraction,
                ),
                tasks,
                key,
            )
        else:
            ft, skipped = dropping_one_class_tasks(
                lambda kept: finetune_stage(
                    hf,
                    data,
                    cell / "finetune",
                    method="mpf",
                    tasks=kept,
                    epochs=args.epochs,
                    context_length=args.context_length,
                    learning_rate=args.finetune_lr,
                    train_fraction=fraction,
                    seed=args.finetune_seed,
                    init="pretrained" if model == "pretrained" else "random",
                ),
                tasks,
                key,
            )
            metrics = evaluate_stage(ft, data, cell / "eval", n_boot=args.bootstrap)
        record = {
            "cell": key,
            "model": model,
            "fraction": fraction,
            "tasks": metrics["tasks"],
            "skipped_tasks": skipped,
            "train_patients": _train_patients(data, tasks, fraction, args.finetune_seed),
        }
        append_cell_result(results_path, record)
        done[key] = record
    timer.stop()

    records = [done[cell_key(m, f)] for m, f in cells]
    pretraining = _pretraining_line(run)
    header = (
        f"# ehrfm study: pretraining benefit\n\n{manifest['counts']['patients_total']} patients "
        f"({manifest['counts']['patients'].get('finetune', '?')} in the finetune split, "
        f"{manifest['counts']['patients'].get('test', '?')} in test); {args.model}-{args.size} pretrained "
        f"{args.steps} steps ({pretraining}; count models in brackets); MPF finetuning {args.epochs} epochs at lr {args.finetune_lr}; "
        f"95% CIs from {args.bootstrap} patient-level bootstrap resamples of the test split\n\n"
    )
    table = header + benefit_table(records, tasks)
    write_text_atomic(out / "pretraining_benefit.md", table)
    plots = benefit_plots(records, tasks, out)
    print()
    print(table)
    print(
        f"table {out / 'pretraining_benefit.md'}; plots {', '.join(str(p) for p in plots)} "
        f"({time.time() - started:.0f} s; stages {json.dumps(timer.seconds)})"
    )
    return 0


def _pretraining_line(run: Path) -> str:
    from ..pretrain.curves import validation_records
    from ..pretrain.metrics import validation_summary

    records = validation_records(run)
    return validation_summary(records[-1]) if records else "no validation record"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="measured studies: convergence of the backbones, pretraining benefit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    studies = p.add_subparsers(dest="study", required=True)

    c = studies.add_parser("convergence", help="pretrain several backbones with one recipe; curves vs references")
    c.add_argument("--data", required=True, type=Path, help="prepared data folder (ehrfm prepare)")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--models", default="llama,mamba,mamba2,bert")
    _add_recipe_arguments(c, steps=400)
    c.set_defaults(func=run_convergence)

    b = studies.add_parser(
        "pretraining-benefit", help="pretrained vs from scratch vs XGBoost at 10-100%% of the patients"
    )
    b.add_argument("--input", type=Path, default=None, help="MEDS folder or FHIR bundles (default: a Synthea cohort)")
    b.add_argument("--format", choices=["meds", "fhir"], default="fhir")
    b.add_argument("--task-sets", default="demo", help="task configs for prepare with --input (default: demo)")
    b.add_argument("--patients", type=int, default=1000, help="Synthea cohort size (default 1000)")
    b.add_argument("--seed", type=int, default=7, help="Synthea seed")
    b.add_argument("--age", default="50-90")
    b.add_argument("--out", type=Path, default=Path("ehrfm-study-benefit"))
    b.add_argument("--model", default="llama", choices=["llama", "mamba", "mamba2"])
    b.add_argument("--tasks", default=",".join(STUDY_TASKS))
    b.add_argument("--fractions", type=_floats, default=FRACTIONS, help="comma-separated (default 0.1,0.25,0.5,1)")
    b.add_argument("--epochs", type=int, default=3, help="finetuning epochs (default 3)")
    b.add_argument(
        "--finetune-lr", type=float, default=1e-3, help="finetuning learning rate (default 1e-3, as the demo)"
    )
    b.add_argument("--finetune-seed", type=int, default=42, help="seed of finetuning and of the patient subsample")
    b.add_argument("--bootstrap", type=int, default=1000)
    b.add_argument("--prepare-option", action="append", default=[], metavar="KEY=VALUE")
    _add_recipe_arguments(b, steps=1000)
    b.set_defaults(func=run_benefit)

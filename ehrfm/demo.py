"""`ehrfm demo`: the whole pipeline on a seeded Synthea cohort (or your own MEDS/FHIR data) in minutes.

cohort (Synthea, cached) -> prepare -> pretrain a Tiny model -> export to HF -> MPF finetuning on the demo tasks
(LOS > 7 days, 30-day readmission, 1-year mortality) -> evaluation on the test split with patient-level bootstrap
CIs -> the XGBoost count baseline -> one table. Every stage is resumable: re-running the same command skips
finished stages and resumes pretraining from its last checkpoint.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_TASKS = ["los_7d", "readmission_30d", "mortality_1y"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the pipeline end to end on a Synthea cohort", description=__doc__)
    p.add_argument("--patients", type=int, default=150,
                   help="Synthea patients to generate (default 150: about 4 min on 2 cores, cached afterwards)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--age", default="50-90", help="Synthea age band (older patients have more admissions)")
    p.add_argument("--input", type=Path, default=None, help="your own MEDS folder or FHIR bundles instead of Synthea")
    p.add_argument("--format", choices=["meds", "fhir"], default="fhir")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task configs/names for --input data (default: the demo tasks)")
    p.add_argument("--out", type=Path, default=Path("ehrfm-demo"), help="output folder (default ./ehrfm-demo)")
    p.add_argument("--model", default="llama",
                   help="backbone(s) to pretrain, comma-separated: llama, mamba, mamba2 (default llama)")
    p.add_argument("--size", choices=["tiny", "small", "medium"], default="tiny")
    p.add_argument("--steps", type=int, default=100, help="pretraining steps per backbone (default 100)")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3,
                   help="pretraining learning rate (default 3e-3: the best of 5e-4/3e-3/1e-2/2e-2 for Tiny Llama at "
                        "100 steps on the demo cohort, README 'Reference perplexities')")
    p.add_argument("--epochs", type=int, default=2, help="finetuning epochs (default 2)")
    p.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples for the CIs")
    p.add_argument("--prepare-option", action="append", default=[], metavar="KEY=VALUE",
                   help="PrepareConfig override, repeatable (e.g. vocab.num_bins=5, splits.test=0.3)")
    p.set_defaults(func=run)


def pretraining_summary(run_dir: Path) -> dict:
    """The last validation record of a pretraining run (val_ppl, step, and the count-model references)."""
    from .pretrain.metrics import read_metrics

    vals = [r for r in read_metrics(run_dir) if r.get("split") == "val"]
    return vals[-1] if vals else {"val_ppl": float("nan"), "step": 0}


def run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data_shards.config import PrepareConfig
    from .data_shards.prepare import prepare
    from .data_shards.shards import read_manifest, write_json_atomic, write_text_atomic
    from .data_shards.synthea import generate_cohort
    from .outputs import claim_run_dir
    from .pipeline import (
        PretrainSpec, StageTimer, baseline_stage, evaluate_stage, export_stage, finetune_stage, pretrain_stage,
        results_table,
    )

    started = time.time()
    backbones = [m.strip() for m in args.model.split(",") if m.strip()]
    bad = [m for m in backbones if m not in ("llama", "mamba", "mamba2")]
    if bad or not backbones:
        raise SystemExit(f"--model: choose causal backbones among llama, mamba, mamba2 (got {args.model!r})")
    out = args.out
    claim_run_dir(out, "demo", inputs=[args.input])  # a new, empty or earlier demo folder (resumes), nothing else
    timer = StageTimer(total=2 + 5 * len(backbones) + 1)

    if args.input is None:
        timer.start("cohort", f"Synthea, {args.patients} patients, seed {args.seed}, ages {args.age} "
                              "(cached after the first run)")
        source, fmt = generate_cohort(args.patients, seed=args.seed, age=args.age), "fhir"
        task_sets = ["demo"]
    else:
        timer.start("cohort", f"your data: {args.input} ({args.format})")
        source, fmt = args.input, args.format
        task_sets = [t for t in (args.tasks or "demo").split(",") if t]
    data = out / "data"
    timer.start("prepare", f"{source} -> {data}")
    if not (data / "manifest.json").exists():
        cfg = load_config(PrepareConfig, None, [f"format={fmt}", *args.prepare_option])
        cfg.tasks = task_sets
        prepare(source, data, cfg)

    manifest = read_manifest(data)
    tasks = [t for t in manifest["tasks"] if manifest["tasks"][t]["labels"] > 0]
    if args.input is None:
        tasks = [t for t in DEMO_TASKS if t in tasks]

    results, paths, pretraining = {}, {}, {}
    for arch in backbones:
        spec = PretrainSpec(architecture=arch, size=args.size, steps=args.steps, context_length=args.context_length,
                            overrides=[f"optim.lr={args.lr}"])
        run_dir, hf_dir = out / f"pretrain_{arch}", out / f"hf_{arch}"
        ft_dir, eval_dir = out / f"finetune_{arch}", out / f"eval_{arch}"
        timer.start(f"pretrain {arch}", f"{args.size}, {args.steps} steps at C={args.context_length} -> {run_dir}")
        pretrain_stage(data, run_dir, spec)
        pretraining[arch] = pretraining_summary(run_dir)
        timer.start(f"export {arch}", str(hf_dir))
        export_stage(run_dir, hf_dir)
        timer.start(f"finetune {arch}", f"MPF on {', '.join(tasks)} -> {ft_dir}")
        finetune_stage(hf_dir, data, ft_dir, method="mpf", tasks=tasks, epochs=args.epochs,
                       context_length=args.context_length)
        timer.start(f"evaluate {arch}", str(eval_dir))
        results[f"{arch}-{args.size} MPF"] = evaluate_stage(ft_dir, data, eval_dir, n_boot=args.bootstrap)
        scratch_ft, scratch_eval = out / f"finetune_{arch}_scratch", out / f"eval_{arch}_scratch"
        timer.start(f"from scratch {arch}", f"same finetuning from random weights (the control) -> {scratch_ft}")
        finetune_stage(hf_dir, data, scratch_ft, method="mpf", tasks=tasks, epochs=args.epochs,
                       context_length=args.context_length, init="random")
        results[f"{arch}-{args.size} MPF, from scratch"] = evaluate_stage(scratch_ft, data, scratch_eval, n_boot=args.bootstrap)
        paths[arch] = {"pretrain run": run_dir, "exported HF model": hf_dir, "finetuned": ft_dir, "evaluation": eval_dir,
                       "from scratch": scratch_eval}
    timer.start("XGBoost baseline", "code counts + ages")
    results["XGBoost (counts)"] = baseline_stage(data, out / "eval_xgboost", tasks=tasks, n_boot=args.bootstrap)
    timer.stop()

    counts = manifest["counts"]
    table = results_table(results, tasks) + "\n" + "\n".join(
        f"pretraining {arch}: validation perplexity {p['val_ppl']:.2f} at step {p['step']}; count models on the same "
        f"split: bigram {p.get('ref_bigram_ppl', float('nan')):.2f}, unigram {p.get('ref_unigram_ppl', float('nan')):.2f}"
        for arch, p in pretraining.items()) + "\n"
    header = (f"# ehrfm demo\n\n{counts['patients_total']} patients, {counts['tokens_total']} tokens, vocabulary "
              f"{manifest['vocab_size']}; test split, 95% CIs from {args.bootstrap} patient-level bootstrap resamples\n\n")
    write_text_atomic(out / "report.md", header + table)
    write_json_atomic(out / "demo_report.json", {
        "tasks": tasks, "stage_seconds": timer.seconds, "results": {k: v["tasks"] for k, v in results.items()},
        "pretraining": pretraining,
        "paths": {a: {k: str(v) for k, v in p.items()} for a, p in paths.items()},
    })
    print()
    print(table)
    for arch, items in paths.items():
        for label, path in items.items():
            print(f"{arch:7s} {label:18s} {path}")
    print(f"plots (ROC, PR, calibration): {paths[backbones[0]]['evaluation']}/<task>/*.png")
    print(f"report: {out / 'report.md'}   ({time.time() - started:.0f} s)")
    return 0

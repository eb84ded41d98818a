"""`ehrfm finetune`, `ehrfm evaluate`, `ehrfm baseline`, `ehrfm embed`.

    ehrfm finetune --model HFDIR --data DIR --out FT --method per-task|mpf|alfia [--lora] [--freeze]
                   [--tasks a,b] [--train-fraction 0.1] [--anaa] [--neftune-alpha 5] [key=value ...]
    ehrfm evaluate --model FT --data DIR --split test --out EVAL
    ehrfm baseline --model xgboost|lightgbm|logreg --data DIR --out EVAL [--embeddings EMB]
    ehrfm embed    --model FT --data DIR --out EMB
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _tasks(text: str | None) -> list[str]:
    return [t for t in (text or "").split(",") if t]


def add_parser(subparsers) -> None:
    from ehrfm.outputs import add_overwrite_argument

    from .anaa import add_anaa_arguments

    p = subparsers.add_parser("finetune", help="finetune an exported model on prepared tasks",
                              description="Finetune an `ehrfm export` folder on the tasks of a prepared data folder.")
    p.add_argument("--model", required=True, type=Path, help="exported model folder (ehrfm_export.json)")
    p.add_argument("--data", required=True, type=Path, help="prepared data folder (manifest.json)")
    p.add_argument("--out", required=True, type=Path, help="finetuned model folder to write")
    p.add_argument("--config", type=Path, help="YAML FinetuneConfig (flags and key=value override it)")
    p.add_argument("--method", choices=["per-task", "mpf", "alfia"])
    p.add_argument("--tasks", help="comma-separated task names (default: every task of the data)")
    p.add_argument("--freeze", action="store_true", default=None, help="frozen backbone: linear/MLP probe")
    p.add_argument("--init", choices=["pretrained", "random"],
                   help="random: same architecture and tokenizer, fresh weights (the from-scratch control)")
    p.add_argument("--lora", action="store_true", default=None, help="peft LoRA r=16 alpha=16 dropout=0.05")
    p.add_argument("--lora-save", choices=["merged", "adapter"], help="save merged weights or the adapter only")
    p.add_argument("--train-fraction", type=float, help="fraction of training patients used (0 < f <= 1)")
    p.add_argument("--pos-weight", help="none | auto | a number (BCE weight of positives)")
    p.add_argument("--neftune-alpha", type=float, help="NEFTune noise alpha (5 or 10; 0 = off)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--patience", type=int)
    p.add_argument("--lr", type=float, dest="learning_rate")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--context-length", type=int)
    p.add_argument("--seed", type=int)
    add_overwrite_argument(p)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. alfia.gating=false)")
    add_anaa_arguments(p)
    p.set_defaults(func=run_finetune)

    e = subparsers.add_parser("evaluate", help="evaluate a finetuned model: metrics with bootstrap CIs, plots")
    e.add_argument("--model", required=True, type=Path, help="finetuned model folder (ehrfm finetune --out)")
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--split", default="test")
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--tasks", help="comma-separated subset of the model's tasks")
    e.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples (default 1000)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--attention-plots", type=int, default=0, metavar="N",
                   help="also save 000 5.8 attention diagnostics (PNG) over N examples (attention backbones)")
    add_overwrite_argument(e)
    e.set_defaults(func=run_evaluate)

    b = subparsers.add_parser("baseline", help="GBDT / logistic-regression baselines on code counts")
    b.add_argument("--model", required=True, choices=["xgboost", "lightgbm", "logreg"])
    b.add_argument("--data", required=True, type=Path)
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--split", default="test")
    b.add_argument("--tasks")
    b.add_argument("--embeddings", type=Path, help="ehrfm embed output: ALFIA-boost features [embeddings + counts]")
    b.add_argument("--bootstrap", type=int, default=1000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--train-fraction", type=float, default=1.0,
                   help="train on this fraction of the finetune split's patients: the same patients as "
                        "`ehrfm finetune --train-fraction F --seed S` with the same --tasks and --seed")
    add_overwrite_argument(b)
    b.set_defaults(func=run_baseline)

    m = subparsers.add_parser("embed", help="export ALF (or pooled) embeddings of a finetuned model")
    m.add_argument("--model", required=True, type=Path)
    m.add_argument("--data", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--splits", default="finetune,finetune_val,test")
    add_overwrite_argument(m)
    m.set_defaults(func=run_embed)


def build_config(args: argparse.Namespace):
    """FinetuneConfig: defaults <- --config YAML <- key=value overrides <- explicit flags."""
    from ehrfm.config import load_config

    from .config import FinetuneConfig

    flags = []
    for key, name in (("method", "method"), ("train_fraction", "train_fraction"), ("pos_weight", "pos_weight"),
                      ("neftune_alpha", "neftune_alpha"), ("epochs", "epochs"), ("patience", "patience"),
                      ("learning_rate", "learning_rate"), ("batch_size", "batch_size"),
                      ("context_length", "context_length"), ("seed", "seed"), ("lora_save", "lora.save"), ("init", "init")):
        value = getattr(args, key, None)
        if value is not None:
            flags.append(f"{name}={value}")
    if args.tasks:
        flags.append(f"tasks={args.tasks}")
    if args.freeze:
        flags.append("freeze=true")
    if args.lora:
        flags.append("lora.enabled=true")
    cfg = load_config(FinetuneConfig, args.config, list(args.overrides) + flags)
    cfg.validate()
    return cfg


def run_finetune(args: argparse.Namespace) -> int:
    from .anaa import anaa_config_from_args
    from .train import finetune

    cfg = build_config(args)
    meta = finetune(args.model, args.data, args.out, cfg, anaa=anaa_config_from_args(args), overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), "best_epoch": meta["best_epoch"], "best_val_auprc": meta["best_val_auprc"]}))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    evaluate(args.model, args.data, args.split, args.out, tasks=_tasks(args.tasks), n_boot=args.bootstrap, seed=args.seed,
             overwrite=args.overwrite)
    if args.attention_plots:
        from .attention_diagnostics import save_finetuned_diagnostics

        paths = save_finetuned_diagnostics(args.model, args.data, args.split, Path(args.out) / "attention",
                                           examples=args.attention_plots, tasks=_tasks(args.tasks))
        print(f"attention diagnostics: {paths['histograms_png']}, {paths['distance_png']}")
    print((Path(args.out) / "report.md").read_text())
    return 0


def run_baseline(args: argparse.Namespace) -> int:
    from .baselines import run_baseline as run

    run(args.model, args.data, args.out, tasks=_tasks(args.tasks), split=args.split, embeddings=args.embeddings,
        n_boot=args.bootstrap, seed=args.seed, overwrite=args.overwrite, train_fraction=args.train_fraction)
    print((Path(args.out) / "report.md").read_text())
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from .baselines import export_embeddings

    paths = export_embeddings(args.model, args.data, args.out, tuple(_tasks(args.splits)), overwrite=args.overwrite)
    print(f"wrote {len(paths)} embedding files under {args.out}")
    return 0

"""`ehrfm finetune`, `ehrfm evaluate`, `ehrfm baseline`, `ehrfm embed`, `ehrfm forecast`, `ehrfm explain`.

ehrfm finetune --model HFDIR --data DIR --out FT --method per-task|mpf|alfia [--lora] [--freeze]
               [--tasks a,b] [--train-fraction 0.1] [--anaa] [--neftune-alpha 5] [key=value ...]
ehrfm evaluate --model FT --data DIR --split test --out EVAL
ehrfm baseline --model xgboost|lightgbm|catboost|logreg|meds-tab --data DIR --out EVAL [--embeddings EMB]
ehrfm embed    --model FT --data DIR --out EMB
ehrfm forecast --model HFDIR --data DIR --out ZS [--tasks a,b] [--samples 20] [--split test]
ehrfm explain  --model FT --data DIR --task T --out EXPLAIN [--rows 64] [--steps 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ehrfm.config_flags import comma_list

# earlier spellings kept beside the generated ``--section.field`` flags
FINETUNE_FLAG_ALIASES = {
    "learning_rate": ["--lr"],
    "lora.enabled": ["--lora"],
    "lora.save": ["--lora-save"],
    "anaa.enabled": ["--anaa"],
    "anaa.sigma_eh": ["--anaa-sigma-eh"],
    "anaa.variant": ["--anaa-variant"],
    "anaa.mode": ["--anaa-mode"],
    "anaa.sigma_norm": ["--anaa-sigma-norm"],
}

FORECAST_FLAG_ALIASES = {
    "sampling.samples": ["--samples"],
    "sampling.temperature": ["--temperature"],
    "sampling.top_p": ["--top-p"],
    "sampling.max_new_tokens": ["--max-new-tokens"],
    "sampling.seed": ["--seed"],
}


def add_parser(subparsers) -> None:
    from ehrfm.config_flags import add_config_arguments
    from ehrfm.outputs import add_overwrite_argument

    from .config import FinetuneConfig

    p = subparsers.add_parser(
        "finetune",
        help="finetune an exported model on prepared tasks",
        description="Finetune an `ehrfm export` folder on the tasks of a prepared data folder.",
    )
    p.add_argument("--model", required=True, type=Path, help="exported model folder (ehrfm_export.json)")
    p.add_argument("--data", required=True, type=Path, help="prepared data folder (manifest.json)")
    p.add_argument("--out", required=True, type=Path, help="finetuned model folder to write")
    p.add_argument("--config", type=Path, help="YAML FinetuneConfig (flags and key=value override it)")
    add_overwrite_argument(p)
    p.add_argument(
        "overrides",
        nargs="*",
        help="config overrides key=value (e.g. alfia.gating=false); they win over flags, which win over --config",
    )
    add_config_arguments(p, FinetuneConfig, aliases=FINETUNE_FLAG_ALIASES)
    p.set_defaults(func=run_finetune)

    e = subparsers.add_parser("evaluate", help="evaluate a finetuned model: metrics with bootstrap CIs, plots")
    e.add_argument("--model", required=True, type=Path, help="finetuned model folder (ehrfm finetune --out)")
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--split", default="test")
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--tasks", help="comma-separated subset of the model's tasks")
    e.add_argument("--bootstrap", type=int, default=1000, help="patient-level bootstrap resamples (default 1000)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--attention-plots",
        type=int,
        default=0,
        metavar="N",
        help="also save 000 5.8 attention diagnostics (PNG) over N examples (attention backbones)",
    )
    add_overwrite_argument(e)
    e.set_defaults(func=run_evaluate)

    b = subparsers.add_parser(
        "baseline", help="GBDT / logistic-regression baselines on code counts; MEDS-Tab (its own environment)"
    )
    b.add_argument("--model", required=True, choices=["xgboost", "lightgbm", "catboost", "logreg", "meds-tab"])
    b.add_argument("--data", required=True, type=Path)
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--split", default="test")
    b.add_argument("--tasks")
    b.add_argument("--embeddings", type=Path, help="ehrfm embed output: ALFIA-boost features [embeddings + counts]")
    b.add_argument("--bootstrap", type=int, default=1000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--train-fraction",
        type=float,
        default=1.0,
        help="train on this fraction of the finetune split's patients: the same patients as "
        "`ehrfm finetune --train-fraction F --seed S` with the same --tasks and --seed",
    )
    add_overwrite_argument(b)
    b.set_defaults(func=run_baseline)

    x = subparsers.add_parser(
        "explain", help="integrated gradients per token and per code for a finetuned model's task"
    )
    x.add_argument("--model", required=True, type=Path, help="finetuned model folder (ehrfm finetune --out)")
    x.add_argument("--data", required=True, type=Path)
    x.add_argument("--task", required=True)
    x.add_argument("--out", required=True, type=Path)
    x.add_argument("--split", default="test")
    x.add_argument("--rows", type=int, default=64, help="label rows explained (the first N of the split)")
    x.add_argument("--steps", type=int, default=128, help="integration points (Gauss-Legendre)")
    x.add_argument("--min-count", type=int, default=5, help="occurrences a code needs to appear in top_codes.png")
    x.add_argument("--patients", type=int, default=5, help="patient pages written (patients/<i>.html)")
    add_overwrite_argument(x)
    x.set_defaults(func=run_explain)

    m = subparsers.add_parser("embed", help="export ALF (or pooled) embeddings of a finetuned model")
    m.add_argument("--model", required=True, type=Path)
    m.add_argument("--data", required=True, type=Path)
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--splits", default="finetune,finetune_val,test")
    add_overwrite_argument(m)
    m.set_defaults(func=run_embed)

    from .config import ForecastConfig

    f = subparsers.add_parser(
        "forecast",
        help="zero-shot predictions: sample patient futures from a pretrained causal model",
        description="Roll each labelled patient's history forward with a pretrained Llama / Mamba / Mamba2 export "
        "and read the task's outcome off the sampled futures (finetune/forecast.py).",
    )
    f.add_argument("--model", required=True, type=Path, help="exported model folder (ehrfm export --out)")
    f.add_argument("--data", required=True, type=Path, help="prepared data folder with tasks")
    f.add_argument("--out", required=True, type=Path, help="output folder (the ehrfm evaluate layout)")
    f.add_argument("--config", type=Path, help="YAML ForecastConfig (flags and key=value override it)")
    add_overwrite_argument(f)
    f.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. sampling.top_p=0.9)")
    add_config_arguments(f, ForecastConfig, aliases=FORECAST_FLAG_ALIASES)
    f.set_defaults(func=run_forecast)


def build_config(args: argparse.Namespace, cls: type | None = None):
    """The command's config (``FinetuneConfig`` unless ``cls`` says otherwise): defaults < --config YAML < flags
    < key=value overrides (``ehrfm.config_flags``), validated."""
    from ehrfm.config import load_config
    from ehrfm.config_flags import config_overrides

    from .config import FinetuneConfig

    cfg = load_config(cls or FinetuneConfig, args.config, config_overrides(args))
    cfg.validate()
    return cfg


def run_finetune(args: argparse.Namespace) -> int:
    from .train import finetune

    cfg = build_config(args)
    meta = finetune(
        args.model, args.data, args.out, cfg, anaa=cfg.anaa if cfg.anaa.enabled else None, overwrite=args.overwrite
    )
    print(
        json.dumps({"out": str(args.out), "best_epoch": meta["best_epoch"], "best_val_auprc": meta["best_val_auprc"]})
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    evaluate(
        args.model,
        args.data,
        args.split,
        args.out,
        tasks=comma_list(args.tasks),
        n_boot=args.bootstrap,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    if args.attention_plots:
        from .attention_diagnostics import save_finetuned_diagnostics

        paths = save_finetuned_diagnostics(
            args.model,
            args.data,
            args.split,
            Path(args.out) / "attention",
            examples=args.attention_plots,
            tasks=comma_list(args.tasks),
        )
        print(f"attention diagnostics: {paths['histograms_png']}, {paths['distance_png']}")
    print((Path(args.out) / "report.md").read_text())
    return 0


def run_forecast(args: argparse.Namespace) -> int:
    from .config import ForecastConfig
    from .forecast import forecast

    forecast(args.model, args.data, args.out, build_config(args, ForecastConfig), overwrite=args.overwrite)
    print((Path(args.out) / "report.md").read_text())
    return 0


def run_baseline(args: argparse.Namespace) -> int:
    from .baselines import run_baseline as run

    if args.model == "meds-tab":
        from .data import FinetuneInputError
        from .meds_tab import run_meds_tab

        if args.embeddings or args.train_fraction != 1.0:
            raise FinetuneInputError("--model meds-tab takes neither --embeddings nor --train-fraction")
        run_meds_tab(
            args.data,
            args.out,
            tasks=comma_list(args.tasks),
            split=args.split,
            n_boot=args.bootstrap,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    else:
        run(
            args.model,
            args.data,
            args.out,
            tasks=comma_list(args.tasks),
            split=args.split,
            embeddings=args.embeddings,
            n_boot=args.bootstrap,
            seed=args.seed,
            overwrite=args.overwrite,
            train_fraction=args.train_fraction,
        )
    print((Path(args.out) / "report.md").read_text())
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    summary = explain(
        args.model,
        args.data,
        args.task,
        args.out,
        split=args.split,
        max_rows=args.rows,
        steps=args.steps,
        min_count=args.min_count,
        patients=args.patients,
        overwrite=args.overwrite,
    )
    c = summary["completeness"]
    print(
        f"wrote {args.out}: {summary['rows']} rows of {args.task}; completeness error median {c['median_abs_error']:.2e}"
        f", max {c['max_abs_error']:.2e} (median |logit - baseline logit| {c['median_abs_logit_difference']:.2f}); "
        f"{100 * c['share_within_tolerance']:.0f}% of rows within {c['tolerance']}"
    )
    return 0


def run_embed(args: argparse.Namespace) -> int:
    from .baselines import export_embeddings

    paths = export_embeddings(args.model, args.data, args.out, tuple(comma_list(args.splits)), overwrite=args.overwrite)
    print(f"wrote {len(paths)} embedding files under {args.out}")
    return 0

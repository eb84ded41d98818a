"""The issue-5 acceptance run: one export + one prepared corpus -> per-task, MPF, ALFIA + LoRA finetuning,
evaluation, the XGBoost baseline and ALFIA-boost (XGBoost on [ALF embeddings + counts]) -> one table.

    python -m ehrfm.finetune.acceptance --model HFDIR --data DIR --out OUT --tasks los_7d,readmission_30d

Writes OUT/<run>/ (finetuned models and evaluation folders) and OUT/table.md (value [95% CI], 1000
patient-level bootstrap resamples unless --bootstrap says otherwise).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from .evaluate import _fmt

COLUMNS = ("auprc", "auroc", "brier", "best_f1", "prevalence", "n")


def run(model: Path, data: Path, out: Path, tasks: list[str], *, epochs: int, context_length: int, n_boot: int,
        seed: int, learning_rate: float, batch_size: int, label: str) -> str:
    from .baselines import export_embeddings, run_baseline
    from .config import FinetuneConfig
    from .evaluate import evaluate
    from .train import finetune

    out.mkdir(parents=True, exist_ok=True)
    results, timings = {}, {}
    specs = (("per-task", False), ("mpf", False), ("alfia", True))
    for method, lora in specs:
        name = f"{method}{' + lora' if lora else ''}"
        cfg = FinetuneConfig(method=method, tasks=tasks, epochs=epochs, context_length=context_length, seed=seed,
                             learning_rate=learning_rate, batch_size=batch_size)
        cfg.lora.enabled = lora
        if lora:
            cfg.patience = 5  # 002 2.4
        started = time.time()
        ft = out / f"ft_{method}"
        if (ft / "finetune.json").exists():  # re-running an interrupted acceptance run reuses finished models
            logging.getLogger("ehrfm").info("reusing %s", ft)
        else:
            finetune(model, data, ft, cfg)
        results[name] = evaluate(ft, data, "test", out / f"eval_{method}", n_boot=n_boot, seed=seed)
        timings[name] = round(time.time() - started, 1)
    started = time.time()
    results["xgboost (counts + ages)"] = run_baseline("xgboost", data, out / "eval_xgboost", tasks=tasks, n_boot=n_boot, seed=seed)
    timings["xgboost (counts + ages)"] = round(time.time() - started, 1)
    started = time.time()
    export_embeddings(out / "ft_alfia", data, out / "emb_alfia")
    results["ALFIA-boost (xgboost on ALF emb + counts)"] = run_baseline(
        "xgboost", data, out / "eval_alfia_boost", tasks=tasks, embeddings=out / "emb_alfia", n_boot=n_boot, seed=seed)
    timings["ALFIA-boost (xgboost on ALF emb + counts)"] = round(time.time() - started, 1)
    lines = [f"# Finetuning acceptance: {label}", "",
             f"model `{model}`, data `{data}`, split test, {n_boot} patient-level bootstrap resamples, seed {seed}, "
             f"{epochs} epochs max, context {context_length}", "",
             "| method | task | " + " | ".join(COLUMNS) + " | seconds |", "|" + "---|" * (len(COLUMNS) + 3)]
    for name, metrics in results.items():
        for task in tasks:
            m = metrics["tasks"][task]
            cells = [_fmt({k: {**m[k], "value": float("nan") if m[k]["value"] is None else m[k]["value"],
                               "ci_low": float("nan") if m[k]["ci_low"] is None else m[k]["ci_low"],
                               "ci_high": float("nan") if m[k]["ci_high"] is None else m[k]["ci_high"]}}, k)
                     for k in COLUMNS]
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + f" | {timings[name]} |")
    table = "\n".join(lines) + "\n"
    for name, text in (("table.md", table),
                       ("results.json", json.dumps({"label": label, "timings": timings, "results": results}, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tasks", required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    from ehrfm.logging import setup_logging

    setup_logging("INFO")
    logging.getLogger("ehrfm").info("acceptance run -> %s", args.out)
    table = run(args.model, args.data, args.out, [t for t in args.tasks.split(",") if t], epochs=args.epochs,
                context_length=args.context_length, n_boot=args.bootstrap, seed=args.seed, learning_rate=args.lr,
                batch_size=args.batch_size, label=args.label or str(args.model))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

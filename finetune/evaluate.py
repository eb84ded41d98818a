"""`ehrfm evaluate`: a finetuned model on one split -> predictions, metrics with CIs, plots, report.

Output folder (shared with `ehrfm baseline`):
    metrics.json                 {model, split, n_bootstrap, seed, tasks: {task: {metric: {value, ci_low,
                                  ci_high, n_valid}, meds_evaluation: {...}}}}
    report.md                    one markdown table, value [95% CI] per metric and task, then meds-evaluation's
    <task>/predictions.parquet   the MEDS prediction schema (meds-evaluation's, typed by it): subject_id,
                                  prediction_time, boolean_value, predicted_boolean_value (probability >= the
                                  best-F1 threshold on this split, 0.5 when undefined), predicted_boolean_probability
    <task>/roc.png, pr.png, calibration.png

Every predictions file is also scored by the MEDS ecosystem's own scorer, ``meds-evaluation``
(``evaluate_binary_classification``): its ``samples_equally_weighted`` block measures what ehrfm's point
estimates measure (AUROC, average precision, Brier on every row once) and agrees with them (tested); its
``subjects_equally_weighted`` block resamples rows so that each patient weighs the same. meds-evaluation gives
point estimates only; the CIs are ehrfm's patient-level bootstrap.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import polars as pl

from ehrfm.data_shards.shards import read_manifest, write_json_atomic

from .data import FinetuneDataset, FinetuneInputError, check_vocabulary, resolve_tasks
from .metrics import bootstrap_metrics

log = logging.getLogger("ehrfm.finetune")
REPORT_METRICS = (
    "auprc",
    "auroc",
    "brier",
    "best_f1",
    "best_f1_threshold",
    "best_f2",
    "best_f2_threshold",
    "prevalence",
    "n",
)


def _plots(y: np.ndarray, p: np.ndarray, folder: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    from ehrfm.outputs import save_figure_atomic

    if len(np.unique(y)) < 2:
        return
    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    frac_pos, mean_pred = calibration_curve(y, p, n_bins=min(10, max(2, len(y) // 10)), strategy="quantile")
    for name, (xs, ys, xl, yl, ref) in {
        "roc": (fpr, tpr, "false positive rate", "true positive rate", ([0, 1], [0, 1])),
        "pr": (rec, prec, "recall", "precision", ([0, 1], [y.mean(), y.mean()])),
        "calibration": (mean_pred, frac_pos, "mean predicted probability", "observed frequency", ([0, 1], [0, 1])),
    }.items():
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(
            xs, ys, marker="o" if name == "calibration" else None, drawstyle="steps-post" if name == "pr" else "default"
        )
        ax.plot(*ref, linestyle="--", color="grey")
        ax.set(xlabel=xl, ylabel=yl, title=f"{title} {name}", xlim=(0, 1), ylim=(0, 1.02))
        fig.tight_layout()
        save_figure_atomic(fig, folder / f"{name}.png")


def _fmt(m: dict, key: str) -> str:
    v = m[key]
    if v["value"] is None or (isinstance(v["value"], float) and math.isnan(v["value"])):
        return "n/a"
    if key == "n":
        return str(int(v["value"]))
    if math.isnan(v["ci_low"]):
        return f"{v['value']:.3f}"
    return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"


def markdown_table(results: dict[str, dict], title: str) -> str:
    header = "| task | " + " | ".join(REPORT_METRICS) + " |"
    lines = [f"# {title}", "", header, "|" + "---|" * (len(REPORT_METRICS) + 1)]
    for task, m in results.items():
        lines.append(f"| {task} | " + " | ".join(_fmt(m, k) for k in REPORT_METRICS) + " |")
    return "\n".join(lines) + "\n"


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_evaluation(
    frame: pl.DataFrame,
    out: Path,
    *,
    model: str,
    split: str,
    n_boot: int = 1000,
    seed: int = 0,
    extra: dict | None = None,
    command: str = "evaluate",
    inputs: list | None = None,
    overwrite: bool = False,
    also=None,
    time_to_event: dict | None = None,
) -> dict:
    """Score ``frame`` (subject_id, prediction_time, boolean_value, predicted_boolean_probability, task) into
    ``out`` (see the module docstring), atomically (temp folder renamed at the end; an existing ``out`` is
    replaced only under the rules of :mod:`ehrfm.outputs`, as an output of ``command``; ``also(folder)`` may
    add files before the rename). Returns metrics.json."""
    from ehrfm.outputs import atomic_output

    with atomic_output(Path(out), command, inputs=inputs or [], overwrite=overwrite) as tmp:
        metrics = _write_evaluation_into(
            tmp, frame, model=model, split=split, n_boot=n_boot, seed=seed, extra=extra, time_to_event=time_to_event
        )
        if also is not None:
            also(tmp)
    return metrics


def _write_evaluation_into(
    tmp: Path,
    frame: pl.DataFrame,
    *,
    model: str,
    split: str,
    n_boot: int,
    seed: int,
    extra: dict | None,
    time_to_event: dict | None = None,
) -> dict:
    results = {}
    for task in frame["task"].unique(maintain_order=True).to_list():
        part = frame.filter(pl.col("task") == task)
        y = part["boolean_value"].to_numpy().astype(bool)
        p = part["predicted_boolean_probability"].to_numpy().astype(float)
        m = bootstrap_metrics(y, p, part["subject_id"].to_numpy(), n_boot=n_boot, seed=seed)
        results[task] = m
        threshold = m["best_f1_threshold"]["value"]
        threshold = 0.5 if threshold is None or math.isnan(threshold) else threshold
        folder = tmp / task
        folder.mkdir()
        preds = part.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("prediction_time").cast(pl.Datetime("us")),
            pl.col("boolean_value").cast(pl.Boolean),
            (pl.col("predicted_boolean_probability") >= threshold).alias("predicted_boolean_value"),
            pl.col("predicted_boolean_probability").cast(pl.Float64),
        )
        m["meds_evaluation"] = write_predictions(preds, folder / "predictions.parquet", seed)
        _plots(y.astype(int), p, folder, task)
        if time_to_event and task in time_to_event:
            m["time_to_event"] = _time_to_event_metrics(time_to_event[task], part, folder, task, n_boot, seed)
    metrics = _clean(
        {"model": model, "split": split, "n_bootstrap": n_boot, "seed": seed, **(extra or {}), "tasks": results}
    )
    write_json_atomic(tmp / "metrics.json", metrics)
    report = markdown_table(results, f"{model} on {split}") + "\n" + meds_evaluation_table(metrics["tasks"])
    survival = {t: m["time_to_event"] for t, m in results.items() if "time_to_event" in m}
    if survival:
        report += "\n" + survival_table(survival)
    (tmp / "report.md").write_text(report)
    return metrics


def write_predictions(preds: pl.DataFrame, path: Path, seed: int) -> dict:
    """Write one task's predictions in the MEDS prediction schema and return meds-evaluation's scores of them
    (both weightings; see the module docstring)."""
    import pyarrow.parquet as pq
    from meds_evaluation.evaluate import evaluate_binary_classification
    from meds_evaluation.schema import PredictionSchema

    pq.write_table(PredictionSchema.align(preds.to_arrow()), path)
    scored = pl.read_parquet(path)
    return evaluate_binary_classification(scored, samples_per_subject=4, resampling_seed=seed)


MEDS_EVALUATION_METRICS = {"auroc": "roc_auc_score", "auprc": "average_precision_score", "brier": "brier_score"}


def meds_evaluation_table(results: dict[str, dict]) -> str:
    """Markdown table of meds-evaluation's scores per task and weighting (point estimates)."""
    names = list(MEDS_EVALUATION_METRICS)
    lines = [
        "## meds-evaluation",
        "",
        "| task | weighting | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 2),
    ]
    for task, m in results.items():
        for weighting, scores in (m.get("meds_evaluation") or {}).items():
            values = [scores.get(MEDS_EVALUATION_METRICS[n]) for n in names]
            cells = ["n/a" if v is None else f"{v:.3f}" for v in values]
            lines.append(f"| {task} | {weighting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def survival_table(results: dict[str, dict]) -> str:
    """Markdown table of time-to-event metrics, value [95% CI] per task."""
    names = sorted({name for m in results.values() for name in m}, key=lambda n: (n != "harrell_c", n))
    lines = ["## time-to-event", "", "| task | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for task, m in results.items():
        lines.append(f"| {task} | " + " | ".join(_fmt(m, n) if n in m else "n/a" for n in names) + " |")
    return "\n".join(lines) + "\n"


def _time_to_event_metrics(data: dict, part: pl.DataFrame, folder: Path, task: str, n_boot: int, seed: int) -> dict:
    """Survival metrics of one time-to-event task (``survival_metrics.horizon_report``) and its calibration plot
    at the horizon. ``data``: time (N,) days, curves (N, G) survival on ``grid`` (G,) days (its last point the
    horizon), rows in ``part``'s order; the risk is the predicted probability of the event by the horizon."""
    from .survival_metrics import horizon_report

    time, event = np.asarray(data["time"], float), part["boolean_value"].to_numpy().astype(bool)
    risk = part["predicted_boolean_probability"].to_numpy().astype(float)
    grid = np.asarray(data["grid"], float)
    metrics = horizon_report(
        time, event, risk, part["subject_id"].to_numpy(), grid[-1], data["curves"], grid, n_boot, seed
    )
    _survival_calibration_plot(time, event, risk, grid[-1], folder, task)
    return metrics


def _survival_calibration_plot(time, event, predicted, horizon: float, folder: Path, title: str) -> None:
    """Predicted probability of the event by the horizon against the Kaplan-Meier estimate, per quintile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sksurv.nonparametric import kaplan_meier_estimator

    from ehrfm.outputs import save_figure_atomic

    if len(time) < 10 or not event.any():
        return
    groups = np.array_split(np.argsort(predicted, kind="mergesort"), 5)
    xs, ys = [], []
    for rows in groups:
        times, survival = kaplan_meier_estimator(event[rows], time[rows])
        before = times <= horizon
        ys.append(1.0 - (survival[before][-1] if before.any() else 1.0))
        xs.append(float(np.mean(predicted[rows])))
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(xs, ys, marker="o")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set(
        xlabel=f"predicted P(event by day {horizon:g})",
        ylabel="Kaplan-Meier estimate",
        title=f"{title} calibration at {horizon:g} days",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    fig.tight_layout()
    save_figure_atomic(fig, folder / "survival_calibration.png")


def evaluate(
    ft_dir: Path,
    data_dir: Path,
    split: str,
    out: Path,
    *,
    tasks: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 64,
    overwrite: bool = False,
) -> dict:
    """Predict every label row of ``split`` with a finetuned model and write the evaluation folder."""
    from ehrfm.devices import compute_device, use_fast_attention
    from ehrfm.outputs import check_output_dir

    from .model import load_finetuned
    from .regularizers import hf_model
    from .train import predict

    check_output_dir(Path(out), "evaluate", inputs=[ft_dir, data_dir], overwrite=overwrite)
    manifest = read_manifest(data_dir)
    model, meta = load_finetuned(ft_dir)
    device = compute_device()
    model.to(device)  # predict runs where the model is
    use_fast_attention(hf_model(model.backbone), device)
    inputs = [ft_dir, data_dir, meta.get("base_model")]
    check_vocabulary(meta["vocab_fingerprint"], Path(ft_dir) / "finetune.json", data_dir, manifest)
    tasks = resolve_tasks(manifest, data_dir, tasks or meta["tasks"])
    unknown = [t for t in tasks if t not in meta["tasks"]]
    if unknown:
        raise FinetuneInputError(f"{ft_dir} was finetuned on {meta['tasks']}, not on {unknown}")
    mpf_ids = meta.get("task_token_ids") if meta["method"] == "mpf" else None
    dataset = FinetuneDataset(data_dir, meta["tasks"], split, meta["context_length"], mpf_ids)
    handle = None
    if meta.get("anaa"):
        from .anaa import ANAAConfig, enable_anaa

        handle = enable_anaa(hf_model(model.backbone), ANAAConfig(**meta["anaa"]))  # eval: deterministic eq. 10
    try:
        pred = predict(model, dataset, batch_size)
    finally:
        if handle is not None:
            handle.remove()
    frame = dataset.label_frame().with_columns(predicted_boolean_probability=pl.Series(pred["probability"]))
    survival = None
    if meta.get("survival_edges"):
        from .survival import SURVIVAL_GRID

        times, task_of = dataset.times(), dataset.task_indices()
        survival = {}
        for name, edges in meta["survival_edges"].items():
            rows = task_of == meta["tasks"].index(name)
            grid = SURVIVAL_GRID.numpy() * edges[-1]
            survival[name] = {"time": times[rows], "curves": pred["survival"][rows], "grid": grid}
    frame = frame.filter(pl.col("task").is_in(tasks))
    metrics = write_evaluation(
        frame,
        out,
        model=str(ft_dir),
        split=split,
        n_boot=n_boot,
        seed=seed,
        extra={"method": meta["method"]},
        inputs=inputs,
        overwrite=overwrite,
        time_to_event=survival,
    )
    log.info("evaluated %s on %s/%s -> %s", ft_dir, data_dir, split, out)
    return metrics


def load_metrics(folder: Path) -> dict:
    return json.loads((Path(folder) / "metrics.json").read_text())

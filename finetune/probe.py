"""`ehrfm probe`: the representation metrics of paper 004 (Tables 1-4) for any exported model.

    ehrfm probe --model HFDIR --data DIR [--split test] [--tasks los_7d ...] [--k 20] [--out PROBE]

* effective rank (exp of the spectral entropy) and condition number of the patient embeddings
  (last token of each patient's most recent ``context_length`` tokens) of ``--split``, and of all its
  visit-level [REG] states (with fewer patients than dimensions the patient-level covariance is singular and
  its condition number infinite; the visit-level one usually has N > d);
* subspace distance (k = 20, normalized to [0, 1]) between the [REG] states of visit t and of visit t+1,
  pooled over patients (004's adjacent-visit consistency);
* frozen-embedding linear-probe AUROC per task: logistic regression fitted on the embeddings of the task's
  finetune-split examples (inputs cut strictly before each prediction time), scored on ``--split``.

Writes ``probe.json`` into ``--out`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ehrfm.data_shards.shards import write_json_atomic


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("probe", help="representation metrics (004) of an exported model", description=__doc__)
    p.add_argument("--model", required=True, type=Path, help="exported model folder (ehrfm export)")
    p.add_argument("--data", required=True, type=Path, help="prepared data folder (ehrfm prepare)")
    p.add_argument("--split", default="test")
    p.add_argument("--tasks", nargs="*", default=None, help="tasks for the linear probe (default: all prepared)")
    p.add_argument("--k", type=int, default=20, help="subspace dimension")
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="folder for probe.json (default: MODEL/probe)")
    p.set_defaults(func=run)


def load_exported_model(model_dir: Path, data_dir: Path):
    """The base model of an export folder after checking its vocabulary against the data's manifest."""
    from transformers import AutoModel

    from ehrfm.pretrain.models import register_auto_classes

    register_auto_classes()

    from ehrfm.data_shards.errors import DataError
    from ehrfm.data_shards.shards import read_manifest

    meta_path = Path(model_dir) / "ehrfm_export.json"
    if not meta_path.exists():
        raise DataError(f"{model_dir}: not an ehrfm export (no ehrfm_export.json); run `ehrfm export` first")
    meta = json.loads(meta_path.read_text())
    manifest = read_manifest(data_dir)
    if meta.get("vocab_fingerprint") != manifest["vocab_fingerprint"]:
        raise DataError(
            f"{model_dir}: vocabulary {meta.get('vocab_fingerprint')} differs from {data_dir}'s "
            f"{manifest['vocab_fingerprint']}: the model was trained on another tokenization"
        )
    from ehrfm.devices import compute_device

    model = AutoModel.from_pretrained(model_dir).to(compute_device())
    return model.eval(), manifest


def _batches(samples: list[dict], batch_size: int, context_length: int):
    from ehrfm.data_shards.collate import assemble_rows

    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        width = max(len(s["input_ids"]) for s in chunk)
        batch = assemble_rows([[s] for s in chunk], min(width, context_length))
        batch.pop("labels")
        yield batch


@torch.no_grad()
def embed_samples(model, samples: list[dict], batch_size: int, context_length: int) -> tuple[torch.Tensor, list]:
    """Last-token patient embeddings (N, H) and, per sample, the [REG] states (n_visits, H)."""
    from ehrfm.data_shards.schema import TokenType
    from ehrfm.devices import autocast, to_device

    device = next(model.parameters()).device
    embeddings, reg_states = [], []
    for batch in _batches(samples, batch_size, context_length):
        with autocast("auto", device):
            hidden = model(**to_device(batch, device)).last_hidden_state.float().cpu()  # (B, L, H) final-norm states
        lengths = batch["attention_mask"].sum(1)
        embeddings.append(hidden[torch.arange(hidden.shape[0]), lengths - 1])
        is_reg = batch["type_ids"] == TokenType.REG
        reg_states += [hidden[b][is_reg[b]] for b in range(hidden.shape[0])]
    return torch.cat(embeddings), reg_states


def _tail(sample: dict, context_length: int) -> dict:
    n = len(sample["input_ids"])
    start = max(0, n - context_length)
    return {k: (v[start:] if isinstance(v, np.ndarray) and v.ndim == 1 else v) for k, v in sample.items()}


def probe(
    model_dir: Path,
    data_dir: Path,
    *,
    split: str = "test",
    tasks: list[str] | None = None,
    k: int = 20,
    context_length: int = 512,
    batch_size: int = 16,
) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from ehrfm.data_shards.examples import TaskExamples
    from ehrfm.data_shards.stream import ShardReader
    from ehrfm.kernels import condition_number, effective_rank, subspace_distance

    model, manifest = load_exported_model(model_dir, data_dir)
    reader = ShardReader(data_dir, manifest["shards"][split])
    samples = [_tail(reader.get(i), context_length) for i in range(len(reader))]
    z, regs = embed_samples(model, samples, batch_size, context_length)
    visits = torch.cat([r for r in regs if len(r)])
    before = torch.cat([r[:-1] for r in regs if len(r) >= 2])
    after = torch.cat([r[1:] for r in regs if len(r) >= 2])
    kk = min(k, before.shape[0], after.shape[0], z.shape[1])
    result = {
        "model": str(model_dir),
        "data": str(data_dir),
        "split": split,
        "patients": int(z.shape[0]),
        "effective_rank": float(effective_rank(z)),
        "condition_number": float(condition_number(z)),
        "visit_states": int(visits.shape[0]),
        "effective_rank_visits": float(effective_rank(visits)),
        "condition_number_visits": float(condition_number(visits)),
        "adjacent_visit_pairs": int(before.shape[0]),
        "k": kk,
        "adjacent_visit_subspace_distance": float(subspace_distance(before, after, kk)),
        "linear_probe_auroc": {},
    }
    for task in tasks if tasks is not None else sorted(manifest["tasks"]):
        train = TaskExamples(data_dir, task, "finetune", context_length)
        test = TaskExamples(data_dir, task, split, context_length)
        y_train = np.array([train[i][1] for i in range(len(train))], dtype=int)
        y_test = np.array([test[i][1] for i in range(len(test))], dtype=int)
        if len(set(y_train)) < 2 or len(set(y_test)) < 2:
            result["linear_probe_auroc"][task] = None  # a split without both classes: AUROC undefined
            continue
        x_train, _ = embed_samples(model, [train[i][0] for i in range(len(train))], batch_size, context_length)
        x_test, _ = embed_samples(model, [test[i][0] for i in range(len(test))], batch_size, context_length)
        clf = LogisticRegression(max_iter=2000).fit(x_train.numpy(), y_train)
        result["linear_probe_auroc"][task] = float(roc_auc_score(y_test, clf.predict_proba(x_test.numpy())[:, 1]))
    return result


def run(args: argparse.Namespace) -> int:
    result = probe(
        args.model,
        args.data,
        split=args.split,
        tasks=args.tasks,
        k=args.k,
        context_length=args.context_length,
        batch_size=args.batch_size,
    )
    out = args.out or args.model / "probe"
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "probe.json", result)
    print(
        f"patients ({result['patients']}): effective rank {result['effective_rank']:.2f}, "
        f"condition number {result['condition_number']:.3g}"
    )
    print(
        f"visit [REG] states ({result['visit_states']}): effective rank {result['effective_rank_visits']:.2f}, "
        f"condition number {result['condition_number_visits']:.3g}"
    )
    print(f"adjacent-visit subspace distance (k={result['k']}) {result['adjacent_visit_subspace_distance']:.4f}")
    for task, auroc in result["linear_probe_auroc"].items():
        print(f"  linear probe {task:24s} AUROC {'n/a (one class)' if auroc is None else f'{auroc:.3f}'}")
    print(f"wrote {out / 'probe.json'}")
    return 0

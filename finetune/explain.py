"""`ehrfm explain`: which codes in a patient's history move a finetuned model's risk, by integrated gradients.

For each label row of a task (one patient history cut strictly before the prediction time, as for evaluation),
integrated gradients (captum's ``LayerIntegratedGradients`` on the backbone's input embedding) attribute the
task's logit to every input token: the path runs from a baseline where every token's concept embedding is
replaced by the ``[PAD]`` embedding (the token's type, time, age and visit streams are kept, so the baseline is
"the same timeline without its codes") to the actual input, ``steps`` points, Gauss-Legendre. A token's
attribution is the sum over the hidden dimensions. Completeness: the attributions of a row sum to the logit
minus the baseline's logit up to the integration error; ``explain.json`` reports that error (absolute, and the
share of rows within 1% of the logit difference plus 1e-3, the tolerance the tests hold a small model to; more
``steps`` shrink it) and ``rows.parquet`` holds it per row.

Output folder:
    explain.json           task, rows explained, steps, completeness (max and median relative error)
    codes.parquet          per code: occurrences, patients, mean and summed attribution, description
    top_codes.png          the codes raising and lowering risk most (mean attribution, >= ``min_count`` uses)
    patients/<i>.html      one patient's history, tokens coloured by attribution (red raises risk, blue
                           lowers), visits on their own lines, code descriptions on hover
    attention/<i>.png      attention backbones only: that patient's attention map for every layer (rows) and
                           head (columns), query position down, key position across, visit starts dashed; a
                           Mamba backbone has no attention matrix (explain.json says so)
Descriptions come from the MEDS ``metadata/codes.parquet`` of the data's source where it has them (ehrfm's FHIR
conversion keeps the FHIR display texts).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ehrfm.data_shards.schema import PAD_ID, SPECIAL_TYPES, TokenType
from ehrfm.data_shards.shards import read_manifest, write_json_atomic

from .data import FinetuneDataset, FinetuneInputError, check_vocabulary, collate, resolve_tasks

log = logging.getLogger("ehrfm.finetune")
COMPLETENESS_TOLERANCE = 0.01  # relative to |logit - baseline logit|, plus 1e-3 absolute
# tokens per forward/backward pass of the integration (rows x steps are split into passes of this size): the
# whole path at once would hold rows x steps x context activations (8 x 128 x 256 tokens: ~19 GB, Tiny Llama)
TOKENS_PER_PASS = 32768


def integrated_gradients(model, batch: dict, steps: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token attributions (B, L) of each row's task logit, the logit differences f(x) - f(baseline) (B,)
    and captum's convergence deltas (B,) (sum of attributions minus that difference)."""
    from captum.attr import LayerIntegratedGradients

    from .regularizers import hf_model

    keys = ("type_ids", "ages", "times", "visit_segments", "visit_orders", "position_ids", "attention_mask", "task")
    extra = tuple(batch[k] for k in keys if k in batch)
    names = [k for k in keys if k in batch]

    def logit(input_ids, *rest):
        return model({"input_ids": input_ids, **dict(zip(names, rest))})["logits"].float()

    layer = hf_model(model.backbone).get_input_embeddings()
    ig = LayerIntegratedGradients(logit, layer)
    baseline_ids = torch.full_like(batch["input_ids"], PAD_ID)
    attributions, delta = ig.attribute(
        batch["input_ids"],
        baselines=baseline_ids,
        additional_forward_args=extra,
        n_steps=steps,
        internal_batch_size=max(1, TOKENS_PER_PASS // batch["input_ids"].shape[1]),
        return_convergence_delta=True,
    )
    with torch.no_grad():
        difference = logit(batch["input_ids"], *extra) - logit(baseline_ids, *extra)
    per_token = attributions.sum(-1) * batch["attention_mask"]
    return per_token.detach(), difference.detach(), delta.detach()


def code_descriptions(data_dir: Path, manifest: dict) -> dict[str, str]:
    """code -> description from the MEDS metadata of the data's source (events/ for FHIR input), if any."""
    from ehrfm.data_shards.meds_dataset import source_of

    path = source_of(data_dir, manifest) / "metadata" / "codes.parquet"
    if not path.is_file():
        return {}
    codes = pl.read_parquet(path, columns=["code", "description"]).drop_nulls()
    return dict(codes.iter_rows())


def explain(
    ft_dir: Path,
    data_dir: Path,
    task: str,
    out: Path,
    *,
    split: str = "test",
    max_rows: int = 64,
    steps: int = 128,
    min_count: int = 5,
    patients: int = 5,
    overwrite: bool = False,
) -> dict:
    """Explain ``task``'s predictions on the first ``max_rows`` label rows of ``split``; writes ``out``."""
    from ehrfm.data_shards.vocab import Vocabulary
    from ehrfm.devices import compute_device
    from ehrfm.outputs import atomic_output, check_output_dir

    from .model import load_finetuned

    check_output_dir(Path(out), "explain", inputs=[ft_dir, data_dir], overwrite=overwrite)  # before the work
    model, meta = load_finetuned(ft_dir)
    device = compute_device()
    model.to(device).eval()
    manifest = read_manifest(data_dir)
    check_vocabulary(meta["vocab_fingerprint"], Path(ft_dir) / "finetune.json", data_dir, manifest)
    if task not in resolve_tasks(manifest, data_dir, [task]) or task not in meta["tasks"]:
        raise FinetuneInputError(f"{ft_dir} was finetuned on {meta['tasks']}, not on {task!r}", task=task)
    if (meta.get("survival_edges") or {}).get(task) is not None:
        raise FinetuneInputError(f"task {task!r} is time-to-event: explain attributes binary heads", task=task)
    mpf_ids = meta.get("task_token_ids") if meta["method"] == "mpf" else None
    dataset = FinetuneDataset(data_dir, meta["tasks"], split, meta["context_length"], mpf_ids)
    rows = [i for i, t in enumerate(dataset.task_indices()) if meta["tasks"][t] == task][:max_rows]
    if not rows:
        raise FinetuneInputError(f"task {task!r} has no label rows in split {split!r}", task=task)
    vocab = Vocabulary.load(Path(data_dir) / "tokenizer")
    labels = dataset.label_frame()
    tokens, types, scores, subjects, deltas, differences = [], [], [], [], [], []
    for start in range(0, len(rows), 8):
        chunk = rows[start : start + 8]
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in chunk]).items()}
        per_token, difference, delta = (t.cpu() for t in integrated_gradients(model, batch, steps))
        batch = {k: v.cpu() for k, v in batch.items()}
        for j, i in enumerate(chunk):
            keep = batch["attention_mask"][j].bool()
            tokens.append(batch["input_ids"][j][keep].numpy())
            types.append(batch["type_ids"][j][keep].numpy())
            scores.append(per_token[j][keep].numpy())
            subjects.append(int(labels["subject_id"][i]))
            deltas.append(float(abs(delta[j])))
            differences.append(float(difference[j]))
    descriptions = code_descriptions(data_dir, manifest)
    codes = aggregate_codes(tokens, types, scores, subjects, vocab.tokens, descriptions)
    summary = {
        "model": str(ft_dir),
        "data": str(data_dir),
        "task": task,
        "split": split,
        "rows": len(rows),
        "steps": steps,
        "baseline": "every token's concept embedding replaced by [PAD]'s; type, time, age and visit streams kept",
        "completeness": completeness(np.array(deltas), np.array(differences)),
    }
    with atomic_output(Path(out), "explain", inputs=[ft_dir, data_dir], overwrite=overwrite) as tmp:
        codes.write_parquet(tmp / "codes.parquet")
        pl.DataFrame(
            {"subject_id": subjects, "logit_minus_baseline": differences, "completeness_error": deltas}
        ).write_parquet(tmp / "rows.parquet")
        _top_codes_plot(codes, min_count, tmp / "top_codes.png", task)
        (tmp / "patients").mkdir()
        for k in range(min(patients, len(tokens))):
            page = patient_html(tokens[k], types[k], scores[k], vocab.tokens, descriptions, f"{task}: patient {k}")
            (tmp / "patients" / f"{k}.html").write_text(page)
        summary["attention_maps"] = _write_attention_maps(
            model, dataset, rows[:patients], device, tmp / "attention", task
        )
        write_json_atomic(tmp / "explain.json", summary)
    log.info("explained %d rows of %s -> %s (completeness %s)", len(rows), task, out, summary["completeness"])
    return summary


def attention_maps(model, batch: dict) -> list[np.ndarray] | None:
    """Attention probabilities of a finetuned model on ``batch``: one (B, heads, L, L) array per layer (query
    rows sum to 1 over the keys the mask allows), captured by ``attention_diagnostics.capturing``; None for a
    backbone without attention (Mamba)."""
    from .attention_diagnostics import capturing
    from .regularizers import hf_model

    base = hf_model(model.backbone)
    if "mamba" in type(base).__name__.lower():
        return None
    with torch.no_grad(), capturing(base) as recorder:
        model(batch)
    return [probabilities.numpy() for probabilities, _allowed in recorder.maps]


def _write_attention_maps(model, dataset, rows: list[int], device, folder: Path, task: str) -> list[str] | str:
    """``folder/<i>.png`` for the first explained rows; the file names, or why there are none."""
    folder.mkdir()
    written = []
    for k, i in enumerate(rows):
        batch = {key: value.to(device) for key, value in collate([dataset[i]]).items()}
        maps = attention_maps(model, batch)
        if maps is None:
            folder.rmdir()
            return "none: the backbone has no attention (Mamba)"
        keep = batch["attention_mask"][0].bool().cpu().numpy()
        visit_starts = np.flatnonzero(batch["type_ids"][0].cpu().numpy()[keep] == int(TokenType.VS))
        _attention_plot([m[0][:, keep][:, :, keep] for m in maps], visit_starts, folder / f"{k}.png", task, k)
        written.append(f"attention/{k}.png")
    return written


def _attention_plot(maps: list[np.ndarray], visit_starts: np.ndarray, path: Path, task: str, k: int) -> None:
    """Layers as rows, heads as columns; each panel (L, L), square-root colour scale so weak links show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = len(maps), maps[0].shape[0]
    fig, axes = plt.subplots(layers, heads, figsize=(1.9 * heads + 0.6, 1.9 * layers + 0.6), squeeze=False)
    for layer, probabilities in enumerate(maps):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(np.sqrt(probabilities[head]), cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            for start in visit_starts:
                ax.axvline(start - 0.5, color="white", lw=0.4, ls="--")
                ax.axhline(start - 0.5, color="white", lw=0.4, ls="--")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=7)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=7)
    fig.suptitle(
        f"{task}, patient {k}: attention (sqrt scale; query down, key across; dashed = visit start)", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def completeness(deltas: np.ndarray, differences: np.ndarray) -> dict:
    """|sum of attributions - (f(x) - f(baseline))| per row (``deltas``) summarised: max and median absolute
    error, median |f(x) - f(baseline)| for scale, and the share of rows within the stated tolerance."""
    within = deltas <= COMPLETENESS_TOLERANCE * np.abs(differences) + 1e-3
    return {
        "max_abs_error": float(deltas.max()),
        "median_abs_error": float(np.median(deltas)),
        "median_abs_logit_difference": float(np.median(np.abs(differences))),
        "share_within_tolerance": float(within.mean()),
        "tolerance": f"{COMPLETENESS_TOLERANCE} x |logit - baseline logit| + 1e-3",
    }


def aggregate_codes(tokens, types, scores, subjects, vocabulary, descriptions) -> pl.DataFrame:
    """Per clinical code (special tokens left out): occurrences, distinct patients, mean and summed
    attribution, description; sorted by mean attribution."""
    special = np.array(sorted({int(TokenType.PAD), *(int(t) for t in SPECIAL_TYPES)}))
    frames = []
    for ids, kinds, values, subject in zip(tokens, types, scores, subjects):
        keep = ~np.isin(kinds, special)
        frames.append(pl.DataFrame({"token_id": ids[keep].astype(np.int64), "score": values[keep], "subject": subject}))
    table = (
        pl.concat(frames)
        .group_by("token_id")
        .agg(
            occurrences=pl.len(),
            patients=pl.col("subject").n_unique(),
            mean_attribution=pl.col("score").mean(),
            total_attribution=pl.col("score").sum(),
        )
    )
    names = [vocabulary[i] for i in table["token_id"].to_list()]
    base = [name.split("//Q")[0] for name in names]
    return table.with_columns(
        code=pl.Series(names), description=pl.Series([descriptions.get(b) for b in base], dtype=pl.String)
    ).sort("mean_attribution", descending=True)


def patient_html(ids, kinds, scores, vocabulary, descriptions, title: str) -> str:
    """One history as HTML: each token a span coloured by its attribution (red up, blue down, scaled by the
    largest magnitude), a new line at each visit start, descriptions and values on hover."""
    scale = float(np.abs(scores).max()) or 1.0
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"]
    parts.append(f"<h3>{html.escape(title)}</h3><p>red raises the predicted risk, blue lowers it</p><div>")
    for token_id, kind, score in zip(ids, kinds, scores):
        name = vocabulary[int(token_id)]
        if kind in (int(TokenType.VS), int(TokenType.INTERVAL)):
            parts.append("<br>")
        alpha = min(1.0, abs(float(score)) / scale)
        colour = f"rgba(220,40,40,{alpha:.2f})" if score > 0 else f"rgba(40,80,220,{alpha:.2f})"
        tip = f"{descriptions.get(name.split('//Q')[0], '')} attribution {float(score):+.4f}"
        parts.append(
            f"<span title='{html.escape(tip, quote=True)}' style='background:{colour};padding:1px 3px;margin:1px;"
            f"display:inline-block;font-family:monospace'>{html.escape(name)}</span>"
        )
    parts.append("</div></body></html>")
    return "".join(parts)


def _top_codes_plot(codes: pl.DataFrame, min_count: int, path: Path, task: str, k: int = 12) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frequent = codes.filter(pl.col("occurrences") >= min_count)
    rows = pl.concat([frequent.head(k), frequent.tail(k)]).unique("token_id", keep="first")
    rows = rows.sort("mean_attribution")
    labels = [f"{c} ({d[:40]})" if d else c for c, d in zip(rows["code"].to_list(), rows["description"].to_list())]
    fig, ax = plt.subplots(figsize=(9, 0.3 * max(len(labels), 4) + 1))
    values = rows["mean_attribution"].to_numpy()
    ax.barh(range(len(values)), values, color=["#d62728" if v > 0 else "#1f77b4" for v in values])
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.set_xlabel("mean attribution to the logit per occurrence")
    ax.set_title(f"{task}: codes raising (red) and lowering (blue) risk, >= {min_count} occurrences")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

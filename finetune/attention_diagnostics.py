"""Attention diagnostics of 000 section 5.8 for a (finetuned) attention model, saved as PNG.

* Figure 4 style: per (layer, head) histogram of attention scores A_ij, each head's scores min-max scaled to
  [0, 1] over all valid entries of all samples (near-binary heads pile up at 0 and 1; ANAA/RNA spread them).
* Figure 6 style (5.8.1): median A_ij as a function of the distance i - j (positive = earlier events), per
  layer pooled over heads and samples.

Scores are captured with a temporary transformers attention function (``"ehrfm_capture"``) that computes the
plain softmax(QK^T * scaling + mask) -- the matrix the paper analyses -- and returns the ordinary attention output,
so any model built on ``AttentionInterface`` (HF Llama/BERT, the ehrfm backbones) works, with or without ANAA
swapped in (the model's previous attention implementation is restored afterwards). Only entries a query may
attend (same document, non-pad, causal where applicable) are counted.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

CAPTURE_NAME = "ehrfm_capture"


class _Recorder:
    def __init__(self):
        self.maps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per call: A (B, H, n, n), allowed (B, n, n)
        self.layer_of: dict[int, int] = {}


_ACTIVE: list[_Recorder] = []


def _capture_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv

    B, H, n, d = query.shape
    n_rep = H // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    s = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    if attention_mask is None:
        allowed = torch.ones(B, 1, n, key.shape[2], dtype=torch.bool, device=query.device)
        if getattr(module, "is_causal", False):
            allowed = allowed.tril()
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask == 0
    allowed = allowed.expand(B, 1, n, key.shape[2])
    A = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    if _ACTIVE:
        _ACTIVE[-1].maps.append((A.detach().float().cpu(), allowed[:, 0].cpu()))
    return (A @ value).transpose(1, 2).contiguous(), A


@contextlib.contextmanager
def capturing(model):
    """Inside the block every forward of ``model`` records its attention maps; yields the recorder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_NAME, _capture_forward)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation or "sdpa"
    rec = _Recorder()
    _ACTIVE.append(rec)
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)
        model.set_attn_implementation(previous)


def _drop_pad_queries(allowed: torch.Tensor) -> torch.Tensor:
    """Padding queries (HF masks let them see the valid prefix; ehrfm masks only themselves) carry no
    attention distribution of a real token: keep rows whose own key is allowed and not alone-with-itself pads."""
    diag = torch.diagonal(allowed, dim1=-2, dim2=-1)
    return allowed & diag[..., :, None]


@torch.no_grad()
def collect(model, batches, num_layers: int | None = None) -> dict:
    """Run ``model`` in eval mode on ``batches`` (dicts of model kwargs) and gather per-layer score samples.

    Returns {"scores": list over layers of list over heads of 1D arrays of allowed A_ij,
             "by_distance": list over layers of dict distance -> 1D array of A_ij (pooled over heads)}.
    """
    was_training = model.training
    model.eval()
    scores: dict[int, dict[int, list]] = {}
    by_dist: dict[int, dict[int, list]] = {}
    with capturing(model) as rec:
        for batch in batches:
            rec.maps.clear()
            model(**batch)
            for layer, (A, allowed) in enumerate(rec.maps[:num_layers] if num_layers else rec.maps):
                ok = _drop_pad_queries(allowed)  # (B, n, n)
                n = ok.shape[-1]
                dist = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).expand_as(ok)
                for h in range(A.shape[1]):
                    scores.setdefault(layer, {}).setdefault(h, []).append(A[:, h][ok].numpy())
                vals = A.permute(1, 0, 2, 3)[:, ok]  # (H, entries)
                dsel = dist[ok].numpy()
                flat = vals.reshape(-1).numpy()
                dd = np.tile(dsel, vals.shape[0])
                for delta in np.unique(dd):
                    by_dist.setdefault(layer, {}).setdefault(int(delta), []).append(flat[dd == delta])
    model.train(was_training)
    return {
        "scores": [[np.concatenate(scores[layer][h]) for h in sorted(scores[layer])] for layer in sorted(scores)],
        "by_distance": [{d: np.concatenate(v) for d, v in sorted(by_dist[layer].items())} for layer in sorted(by_dist)],
    }


def scaled_histograms(scores, bins: int = 50):
    """Min-max scale each head's scores to [0, 1] and histogram them: (layers, heads, bins) counts, edges."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = []
    for layer in scores:
        row = []
        for s in layer:
            lo, hi = float(s.min()), float(s.max())
            scaled = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
            row.append(np.histogram(scaled, bins=edges)[0])
        counts.append(row)
    return np.asarray(counts), edges


def median_by_distance(by_distance):
    """Per layer: (distances, medians) arrays sorted by distance i - j."""
    out = []
    for layer in by_distance:
        ds = np.array(sorted(layer))
        out.append((ds, np.array([np.median(layer[d]) for d in ds])))
    return out


def save_diagnostics(model, batches, out_dir, *, label: str = "model", bins: int = 50) -> dict:
    """Write ``{label}_attention_histograms.png`` and ``{label}_median_attention_vs_distance.png`` into
    ``out_dir``; returns the paths and the computed arrays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = collect(model, batches)
    counts, edges = scaled_histograms(data["scores"], bins)
    medians = median_by_distance(data["by_distance"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    L, H = counts.shape[:2]
    fig, axes = plt.subplots(L, H, figsize=(2.2 * H, 1.8 * L), squeeze=False, sharex=True)
    centers = 0.5 * (edges[1:] + edges[:-1])
    for layer in range(L):
        for h in range(H):
            ax = axes[layer][h]
            ax.bar(centers, counts[layer, h] / max(1, counts[layer, h].sum()), width=edges[1] - edges[0])
            ax.set_yscale("log")
            ax.set_title(f"layer {layer} head {h}", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"{label}: attention scores, min-max scaled per head")
    fig.tight_layout()
    hist_path = out / f"{label}_attention_histograms.png"
    fig.savefig(hist_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layer, (ds, med) in enumerate(medians):
        ax.plot(ds, med, label=f"layer {layer}", lw=1)
    ax.set_xlabel("distance i - j (positive: earlier events)")
    ax.set_ylabel("median attention A_ij")
    ax.set_title(f"{label}: median attention vs distance")
    ax.legend(fontsize=7)
    fig.tight_layout()
    dist_path = out / f"{label}_median_attention_vs_distance.png"
    fig.savefig(dist_path, dpi=110)
    plt.close(fig)
    return {
        "histograms_png": str(hist_path),
        "distance_png": str(dist_path),
        "counts": counts,
        "edges": edges,
        "medians": medians,
    }


def save_finetuned_diagnostics(
    ft_dir, data_dir, split: str, out_dir, *, examples: int = 32, tasks: list[str] | None = None, batch_size: int = 8
) -> dict:
    """Diagnostics of a finetuned model folder over the first ``examples`` task examples of ``split`` (inputs
    cut at their prediction times, as the model saw them). Mamba backbones have no attention: refused."""
    from ehrfm.data_shards.collate import assemble_rows
    from ehrfm.data_shards.examples import TaskExamples

    from .data import FinetuneInputError
    from .model import hf_model, load_finetuned

    model, meta = load_finetuned(ft_dir)
    base = hf_model(model.backbone)
    if "mamba" in type(base).__name__.lower():
        raise FinetuneInputError(f"{ft_dir}: a Mamba backbone has no attention to diagnose")
    if "xlnet" in type(base).__name__.lower():
        raise FinetuneInputError(f"{ft_dir}: XLNet's relative attention is not captured by the diagnostics")
    task = (tasks or meta["tasks"])[0]
    context = meta.get("context_length") or 512
    dataset = TaskExamples(data_dir, task, split, context)
    samples = [dataset[i][0] for i in range(min(examples, len(dataset)))]
    if not samples:
        raise FinetuneInputError(f"{data_dir}: task {task!r} has no {split} examples to diagnose")
    batches = []
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo : lo + batch_size]
        batch = assemble_rows([[s] for s in chunk], max(len(s["input_ids"]) for s in chunk))
        batch.pop("labels")
        batches.append(batch)
    return save_diagnostics(base, batches, out_dir, label=f"{Path(ft_dir).name}_{task}")

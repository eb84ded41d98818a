"""Validation curves of pretraining runs beside the count-model references (PNG).

Every `ehrfm pretrain` run writes ``RUN/val_ppl.png`` when it ends; `ehrfm study convergence` draws several
runs (one panel each, since BERT's masked-token perplexity and the causal models' next-token perplexity have
different references) into one figure. Per panel, on a log y axis:

* ``val_ppl`` against the optimizer step (solid), and for causal models ``val_code_ppl``, the perplexity on
  clinical-code targets alone (dotted);
* horizontal lines at the references of the same validation split (``data_shards.reference_ppl``): unigram
  (grey) and bigram (black) over all targets, dashed the same over code targets.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..metrics_log import read_metrics
from ..outputs import save_figure_atomic

# record key -> (label, colour, line style) of the horizontal reference lines
REFERENCE_LINES = {
    "ref_unigram_ppl": ("unigram", "0.6", "-"),
    "ref_bigram_ppl": ("bigram", "black", "-"),
    "ref_code_unigram_ppl": ("unigram, codes", "0.6", "--"),
    "ref_code_bigram_ppl": ("bigram, codes", "black", "--"),
}


def validation_records(run_dir: Path) -> list[dict]:
    """The ``"split": "val"`` records of a run's metrics.jsonl, in step order."""
    return [r for r in read_metrics(run_dir) if r.get("split") == "val"]


def crossing_step(records: list[dict], reference: str = "ref_bigram_ppl") -> int | None:
    """First validated step whose val_ppl is below the record's ``reference`` (None: never, or no reference)."""
    for r in records:
        if reference in r and r["val_ppl"] < r[reference]:
            return int(r["step"])
    return None


def _finite(values: list) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def plot_validation_curves(runs: dict[str, Path], path: Path, *, title: str = "") -> Path | None:
    """One panel per run (label -> run folder) into ``path`` (PNG, written atomically); None when no run has a
    validation record yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: validation_records(run) for label, run in runs.items()}
    curves = {label: records for label, records in curves.items() if records}
    if not curves:
        return None
    fig, panels = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.6), squeeze=False)
    for ax, (label, records) in zip(panels[0], curves.items()):
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["val_ppl"] for r in records], marker="o", markersize=3, color="tab:blue", label="val_ppl")
        codes = [r.get("val_code_ppl") for r in records]
        if "ref_code_bigram_ppl" in records[-1] and _finite(codes):
            ax.plot(steps, codes, marker="o", markersize=3, linestyle=":", color="tab:orange", label="val_code_ppl")
        masked = "ref_bigram_ppl" not in records[-1]  # MLM: its one reference is the code-target unigram
        for key, (name, colour, style) in REFERENCE_LINES.items():
            if key in records[-1]:
                value = records[-1][key]
                name = "unigram, masked code targets" if masked and key == "ref_unigram_ppl" else name
                ax.axhline(value, color=colour, linestyle=style, linewidth=1, label=f"{name} {value:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation perplexity (log)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def perplexity_report(argv: list[str]) -> dict:
    """`ehrfm bench perplexity --data DATA [--run RUN ...]`: the count-model references of a prepared folder,
    over all next-token targets and over clinical-code targets alone, and each run's last and best validation
    perplexity on the same two target sets (how much of a low perplexity the deterministic structure tokens
    make)."""
    import argparse

    from ..data_shards.reference_ppl import for_data_dir
    from ..data_shards.shards import read_manifest

    parser = argparse.ArgumentParser(prog="ehrfm bench perplexity", description=perplexity_report.__doc__)
    parser.add_argument("--data", type=Path, required=True, help="a prepared folder")
    parser.add_argument("--run", type=Path, action="append", default=[], help="a pretraining run folder, repeatable")
    args = parser.parse_args(argv)
    reference = for_data_dir(args.data, read_manifest(args.data))
    runs = []
    for run in args.run:
        records = validation_records(run)
        if not records:
            runs.append({"run": str(run), "validation": None})
            continue
        best = min(records, key=lambda r: r["val_ppl"])
        runs.append(
            {
                "run": str(run),
                "last_step": records[-1]["step"],
                "all": {"last": records[-1]["val_ppl"], "best": best["val_ppl"], "best_step": best["step"]},
                "codes": {
                    "last": records[-1].get("val_code_ppl"),
                    "best": min((r.get("val_code_ppl", math.inf) for r in records), default=None),
                },
                "first_step_below_bigram": crossing_step(records),
            }
        )
    return {"data": str(args.data), "reference_perplexity": reference, "runs": runs}

"""`ehrfm bench train-throughput`: real (non-pad) tokens/s of pretraining, packed vs padded, and of the
data loader alone.

    ehrfm bench train-throughput [--data DIR | --patients 60 --seed 7 --history-lookback all]
                                 [--model llama --size small] [--context 512 --batch-size 4 --steps 8 --warmup 2]

* packed: the engine's stream (best-fit packing of documents into rows of ``context`` tokens, block-diagonal
  masks), a full AdamW step each iteration.
* padded (HF-style): the same patients, cut into the same documents, in random order, one document per row,
  padded to the longest row of the batch (``DataCollatorWithPadding``; "padded_hf_style") or to the context
  length (``padding="max_length"``; "padded_max_length"); same model, same step. The headline ratio is
  against the dynamic-padding loop, the stronger baseline.
* loader: the packed stream iterated without training.

Per loop: real tokens/s and the pad fraction (padded slots / all slots, slots = rows x row length) of the
timed batches, and ``stream_pad_fraction`` over the loop's first ``--loader-batches`` batches (the timed
ones among them; steadier). Next to each measured ratio, its *slot bound*: (1 - pad fraction packed) /
(1 - pad fraction padded), the speedup if a step's time depended only on its slots. It is the ratio packing
alone can buy; the measurement departs from it by what does not scale with slots: per-step costs (the AdamW
update, kernel launches, and threads waiting at barriers on a busy machine) favour the loop with more slots
per step (packed rows are full), attention's cost growing with row length favours the short padded rows.
With ``--threads 1`` on a 2-core CPU the measurement stays within a few percent of the bound (README,
"Packing where it matters"). ``documents`` describes the timed split: sequences (patients),
documents after cutting at ``--context``, and their mean length. The history option of the data
(``history.lookback``, e.g. ``inpatient_24h``) is the prepared folder's, or ``--history-lookback`` for the
generated cohort.

Targets: packed / padded >= 2.5x real tokens/s; loader / training >= 10x.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ..data_shards.config import LOOKBACKS


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ehrfm bench train-throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=None, help="prepared folder (default: prepare a Synthea cohort)")
    p.add_argument("--patients", type=int, default=60, help="Synthea cohort size when --data is not given")
    p.add_argument("--seed", type=int, default=7, help="Synthea cohort seed")
    p.add_argument("--model", default="llama")
    p.add_argument("--size", default="small")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--loader-batches", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--age", default="50-90", help="Synthea age range of the generated cohort")
    p.add_argument(
        "--history-lookback",
        choices=LOOKBACKS,
        default=None,
        help="history.lookback of the generated cohort (default all); with --data, the folder's own applies",
    )
    args = p.parse_args(argv)
    if args.data is not None and args.history_lookback is not None:
        p.error("--history-lookback prepares the generated cohort; a --data folder keeps its own history.lookback")
    return args


def _prepare_synthea(patients: int, seed: int, age: str, out: Path, lookback: str = "all") -> Path:
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.prepare import prepare
    from ehrfm.data_shards.synthea import generate_cohort

    fhir = generate_cohort(patients, seed=seed, age=age, threads=1, progress=False)
    cfg = PrepareConfig(format="fhir", tasks=[])
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test, cfg.splits.val_fraction = 1.0, 0.0, 0.0, 0.0
    cfg.splits.respect_meds_splits = False
    cfg.history.lookback = lookback
    prepare(fhir, out, cfg, progress=False)
    return out


def _pad_to(batches, length: int):
    """Right-pad every (B, L) tensor of each batch to (B, length): ids/streams 0, labels -100."""
    import torch.nn.functional as F

    for batch in batches:
        extra = length - batch["input_ids"].shape[1]
        yield {k: F.pad(v, (0, extra), value=-100 if k == "labels" else 0) for k, v in batch.items()}


def document_stats(data: Path, shards: list[dict], context: int) -> dict:
    """Sequences of a split, the documents they become cut at ``context`` (``long_sequences="split"``), and
    the documents' mean length."""
    from ehrfm.data_shards.shard_codec import read_streams

    lengths = [int(n) for shard in shards for n in read_streams(data / shard["path"], ())[0]]
    docs = sum(math.ceil(n / context) for n in lengths)
    return {"sequences": len(lengths), "documents": docs, "mean_document_length": sum(lengths) / max(docs, 1)}


def slot_bound(packed_pad_fraction: float, padded_pad_fraction: float) -> float:
    """Packed / padded real tokens/s if a step's time depended only on its slots: the ratio of the loops'
    real-token fractions (module docstring)."""
    return (1 - packed_pad_fraction) / (1 - padded_pad_fraction)


def pad_fraction(batches, n: int) -> float:
    """Padded slots / all slots of the next ``n`` batches."""
    from ..data_shards.packing_report import count_slots

    counts = count_slots(itertools.islice(batches, n))
    return 1 - counts["real_tokens"] / counts["token_slots"]


def _interleaved_training(loops: dict, build, steps: int, warmup: int) -> dict:
    """One model + AdamW per loop, trained round-robin one step at a time, so that load from other processes
    on the machine hits every loop alike and the ratios stay meaningful. Returns per-loop timings."""
    import torch

    runs = {}
    for name, batches in loops.items():
        torch.manual_seed(0)
        model = build()
        model.train()
        runs[name] = {
            "model": model,
            "opt": torch.optim.AdamW(model.parameters(), lr=1e-4),
            "batches": batches,
            "times": [],
            "real": 0,
            "slots": 0,
        }
    for i in range(warmup + steps):
        for r in runs.values():
            batch = next(r["batches"])
            t0 = time.perf_counter()
            r["model"](**batch).loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i >= warmup:
                r["times"].append(dt)
                r["real"] += int(batch["attention_mask"].sum())
                r["slots"] += batch["attention_mask"].numel()
    out = {}
    for name, r in runs.items():
        total = sum(r["times"])
        out[name] = {
            "real_tokens_per_s": r["real"] / total,
            "slot_tokens_per_s": r["slots"] / total,
            "pad_fraction": 1 - r["real"] / r["slots"],
            "step_time_s_median": statistics.median(r["times"]),
            "steps": steps,
        }
    return out


def run(argv: list[str]) -> dict:
    import torch

    from ehrfm.data_shards.shards import read_manifest
    from ehrfm.data_shards.stream import EhrDataLoader, PatientStream, StreamConfig
    from ehrfm.pretrain.models import build_model

    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="ehrfm-bench-")
        data = _prepare_synthea(
            args.patients, args.seed, args.age, Path(tmp.name) / "data", args.history_lookback or "all"
        )
    manifest = read_manifest(data)
    split = "pretrain"
    documents = document_stats(Path(data), manifest["shards"][split], args.context)

    def stream(mode: str, pack_window: int):
        cfg = StreamConfig(
            context_length=args.context,
            batch_size=args.batch_size,
            mode=mode,
            long_sequences="split",
            shuffle_buffer=1024,
            pack_window=pack_window,
            seed=0,
            infinite=True,
        )
        return iter(EhrDataLoader(PatientStream(data, split, cfg)))

    # loader alone
    it = stream("packed", 64)
    next(it)
    t0, real = time.perf_counter(), 0
    for _ in range(args.loader_batches):
        real += int(next(it)["attention_mask"].sum())
    loader_tps = real / (time.perf_counter() - t0)

    def loops() -> dict:
        return {
            "packed": stream("packed", 64),
            "padded_hf_style": stream("padded", args.batch_size),  # window = batch: random order, no bucketing
            "padded_max_length": _pad_to(stream("padded", args.batch_size), args.context),
        }

    # the first --loader-batches batches of each loop (the timed ones among them): a steadier pad fraction than
    # that of the few timed steps
    stream_pad = {name: pad_fraction(batches, args.loader_batches) for name, batches in loops().items()}
    results = _interleaved_training(
        loops(), lambda: build_model(args.model, args.size, vocab_size=manifest["vocab_size"]), args.steps, args.warmup
    )
    for name, fraction in stream_pad.items():
        results[name]["stream_pad_fraction"] = fraction
    packed, padded, max_length = results["packed"], results["padded_hf_style"], results["padded_max_length"]
    ratio = packed["real_tokens_per_s"] / padded["real_tokens_per_s"]
    bound = slot_bound(packed["pad_fraction"], padded["pad_fraction"])
    stream_bound = slot_bound(packed["stream_pad_fraction"], padded["stream_pad_fraction"])
    out = {
        "model": f"{args.model}-{args.size}",
        "context_length": args.context,
        "batch_rows": args.batch_size,
        "history_lookback": manifest.get("config", {}).get("history", {}).get("lookback", "all"),
        "split_patients": sum(s["rows"] for s in manifest["shards"][split]),
        "documents": documents,
        "torch_threads": torch.get_num_threads(),
        **results,
        "packed_over_padded": ratio,
        "packed_over_padded_slot_bound": bound,
        "packed_over_padded_stream_slot_bound": stream_bound,
        "packed_over_padded_max_length": packed["real_tokens_per_s"] / max_length["real_tokens_per_s"],
        "packed_over_padded_max_length_slot_bound": slot_bound(packed["pad_fraction"], max_length["pad_fraction"]),
        "loader_real_tokens_per_s": loader_tps,
        "loader_over_training": loader_tps / packed["real_tokens_per_s"],
        "goals": {"packed_over_padded": 2.5, "loader_over_training": 10.0},
    }
    print(
        f"packed / padded real tokens/s: {ratio:.2f}x measured, {bound:.2f}x slot bound (pad fraction "
        f"{padded['pad_fraction']:.1%} padded, {packed['pad_fraction']:.1%} packed); over {args.loader_batches} "
        f"batches {stream_bound:.2f}x ({padded['stream_pad_fraction']:.1%}, {packed['stream_pad_fraction']:.1%}); "
        f"{documents['documents']} documents, mean {documents['mean_document_length']:.0f} tokens",
        file=sys.stderr,
    )
    if tmp is not None:
        tmp.cleanup()
    return out

"""`ehrfm plan`: size a pretraining run on paper before asking for GPUs.

    ehrfm plan --patients 100000 --tokens-per-patient 2500 --model llama --size medium --gpus 8 [--gpu h100]
        [--context 512] [--batch-size 8] [--grad-accum 1] [--epochs 1] [--engine ddp fsdp ...] [--vocab 4470]
        [--mfu 0.4] [--config pretrain.yaml] [key=value ...] [--json-out plan.json]

For N patients of T tokens each (the patients pretraining reads: the pretrain split) it estimates the FHIR
input, the prepared folder on disk and how long `ehrfm prepare` takes (FHIR and MEDS input, one process);
tokens per optimizer step and steps per epoch; memory per GPU under each engine; the training FLOPs and
GPU-hours; the data-loader processes a GPU needs; and the same run on this project's 2-core CPU. The run's
settings (context, rows per GPU, accumulation, activation checkpointing, model overrides) are
resolved as `ehrfm pretrain` resolves them (defaults < the size's recipe < --config < flags < key=value).

Formulas (B rows per GPU per micro-step, C context, G GPUs, A accumulation steps, P parameters, L layers, d
hidden size, V vocabulary, f the packed real-token fraction):

    token slots per step  = B C G A;  real tokens per step = f B C G A
    steps per epoch       = ceil(N T / (f B C G A))
    memory per GPU        = P (w + g + o), each term divided by G where the engine shards it (ENGINE_STATE)
                            + activations B C d (34 L)       (B C d (2 L + 34) with activation checkpointing)
                            + logits B C V 6
    training FLOPs        = flops_per_token x token slots    (pretrain.metrics.flops_per_token: 6 x the matmul
                            parameters, LM head included, + attention 12 L d C bidirectional, 6 L d C causal)
    GPU-hours             = training FLOPs / (peak bf16 FLOP/s x MFU) / 3600

Every number is marked "measured" (a constant measured on this project's data and machine, or counted from
the model) or "assumed", with its source; a result is "assumed" as soon as one assumed number enters it. The
constants live in ``CONSTANTS``, the one place to update when a measurement changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Literal

from ..pretrain.config import ARCHITECTURE_NAMES, SIZE_NAMES, STRATEGIES

Kind = Literal["measured", "assumed"]
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Constant:
    """A number the plan rests on, in ``unit``: measured on this project's data or machine, or assumed."""

    value: float
    unit: str
    kind: Kind
    source: str


CONSTANTS: dict[str, Constant] = {
    "fhir_events_per_s": Constant(
        13_846,
        "events/s",
        "measured",
        "ehrfm bench prepare, FHIR -> shards, one process, 2-core CPU, 100x corpus (1,000 Synthea bundles, 2.63M "
        "events) in 190 s; `--jobs 2` 28,001 events/s",
    ),
    "meds_events_per_s": Constant(
        194_783,
        "events/s",
        "measured",
        "ehrfm bench prepare, MEDS -> shards, one process, 2-core CPU, 100x corpus (11.6M events) in 60 s; `--jobs 2` "
        "344,526 events/s",
    ),
    "shard_bytes_per_token": Constant(
        8.08,
        "bytes/token",
        "measured",
        "prepared shards (format 3, data_shards/shard_codec.py) of a 40-patient Synthea cohort: 1,176,026 bytes for "
        "145,488 tokens (format 2 took 26.1)",
    ),
    "events_bytes_per_event": Constant(
        6.7,
        "bytes/event",
        "measured",
        "the events/ folder (FHIR converted to MEDS) that prepare keeps for FHIR input: 880,177 bytes for "
        "131,421 events, same 40-patient cohort",
    ),
    "tokens_per_event": Constant(
        1.107,
        "tokens/event",
        "measured",
        "same 40-patient cohort: 145,488 tokens from 131,421 input events (1.06 on the 200-patient demo cohort)",
    ),
    "fhir_bytes_per_patient": Constant(
        6.33e6,
        "bytes",
        "measured",
        "Synthea FHIR R4 JSON of the 320-patient demo cohort (aged 60-90, seed 7): 2,025,000,135 bytes",
    ),
    "fhir_events_per_patient": Constant(
        2_450, "events", "measured", "the same 320-patient cohort: 784k events (issue 19)"
    ),
    "packed_real_token_fraction": Constant(
        0.99,
        "",
        "measured",
        "ehrfm bench packing, C=512, long_sequences=split, pretrain split of the 40-patient cohort: 75,511 real "
        "tokens in 76,288 slots",
    ),
    "loader_tokens_per_s": Constant(
        3.2e6,
        "real tokens/s",
        "measured",
        "packed EhrDataLoader alone, one process (num_workers=0), C=512, batch 8, 40-patient cohort, quiet 2-core "
        "CPU, format-3 shards: median of 3 runs of 400 batches (2.5-3.7M; format 2: 2.6-4.6M, median 4.0M)",
    ),
    "cpu_small_llama_512_tokens_per_s": Constant(
        1_650,
        "real tokens/s",
        "measured",
        "ehrfm pretrain, Small Llama, C=512, fp32, this project's 2-core CPU (issue 19); its FLOP rate is "
        "assumed to carry over to other models and contexts",
    ),
    "mfu": Constant(
        0.40,
        "",
        "assumed",
        "sustained fraction of the GPU's peak bf16 FLOP/s; models of tens of millions of parameters often "
        "reach less: read the mfu of RUN/metrics.jsonl after a few steps",
    ),
    "activation_bytes_per_layer_hidden": Constant(
        34,
        "B/token/layer/d",
        "assumed",
        "bf16 transformer layer with flash / memory-efficient attention (no C x C scores), feed-forward 4 d: "
        "34 d bytes per token (Korthikanti et al. 2022); used for every backbone",
    ),
    "logit_bytes_per_vocab": Constant(6, "B/token/V", "assumed", "bf16 logits + their fp32 copy for the loss"),
}
# the configuration the CPU rate was measured on: (architecture, size, context)
CPU_REFERENCE = ("llama", "small", 512)
ALL_STATE = ("weights", "grads", "optimizer")


@dataclasses.dataclass(frozen=True)
class TrainingState:
    """Bytes per parameter an engine keeps on each GPU for the weights, the gradients and AdamW (bf16 mixed
    precision: 16 in all), and which of the three it shards over the GPUs (the others are replicated)."""

    weights: int
    grads: int
    optimizer: int
    sharded: tuple[str, ...] = ()

    def bytes_per_gpu(self, params: int, gpus: int) -> dict[str, float]:
        """{weights, grads, optimizer}: bytes per GPU for ``params`` parameters over ``gpus`` GPUs."""
        return {part: params * getattr(self, part) / (gpus if part in self.sharded else 1) for part in ALL_STATE}


# ddp and fsdp keep fp32 weights and gradients (bf16 autocast / FSDP2's bf16 compute copies) and AdamW's fp32
# m and v; DeepSpeed keeps bf16 weights and gradients and fp32 master weights, m and v in the optimizer
ENGINE_STATE: dict[str, TrainingState] = {
    "ddp": TrainingState(4, 4, 8),
    "fsdp": TrainingState(4, 4, 8, sharded=ALL_STATE),
    "deepspeed-zero2": TrainingState(2, 2, 12, sharded=("grads", "optimizer")),
    "deepspeed-zero3": TrainingState(2, 2, 12, sharded=ALL_STATE),
}
STATE_SOURCE = (
    "mixed-precision AdamW, 16 bytes per parameter: ddp replicates all; deepspeed-zero2 shards gradients and "
    "optimizer; fsdp and deepspeed-zero3 shard all (not counted: DDP buckets, FSDP's unsharded block in flight, "
    "the CUDA context, fragmentation)"
)


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One result: ``value`` in ``unit``, its kind and how it was computed (formula and constants)."""

    value: float
    unit: str
    kind: Kind
    basis: str


def derived(value: float, unit: str, basis: str, *uses: Constant | Quantity) -> Quantity:
    """A result computed from the inputs and ``uses``: "assumed" if any of them is, else "measured"."""
    kind: Kind = "assumed" if any(u.kind == "assumed" for u in uses) else "measured"
    return Quantity(value, unit, kind, basis)


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """What the plan is asked about. ``batch_size``: rows per GPU per micro-step; ``mfu``: None =
    ``CONSTANTS["mfu"]``; ``model_overrides``: HF config fields over the size's preset (``model.overrides``)."""

    patients: int
    tokens_per_patient: float
    gpus: int
    architecture: str
    size: str
    vocab_size: int
    context_length: int
    batch_size: int
    grad_accum: int
    epochs: float
    gpu: str
    activation_checkpointing: bool
    engines: tuple[str, ...] = STRATEGIES
    mfu: float | None = None
    model_overrides: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        from ..config import ConfigError, check_range

        for name in ("patients", "gpus", "vocab_size", "context_length", "batch_size", "grad_accum"):
            check_range(self, name, ge=1)
        for name in ("tokens_per_patient", "epochs"):
            check_range(self, name, gt=0)
        check_range(self, "mfu", gt=0, le=1)
        unknown = sorted(set(self.engines) - set(ENGINE_STATE))
        if unknown:
            raise ConfigError(f"engines: unknown {unknown}; choose from {list(ENGINE_STATE)}")


def gpu_peak(name: str) -> tuple[str, float]:
    """(device name, dense bf16 peak FLOP/s) of ``name`` (``h100``, ``h100-pcie``, ``a100``, ...), from
    ``pretrain.metrics.PEAK_FLOPS``."""
    from ..config import ConfigError
    from ..pretrain.metrics import PEAK_FLOPS

    for key, value in PEAK_FLOPS.items():
        if key.lower() == name.replace("-", " ").lower():
            return key, value
    choices = ", ".join(key.lower().replace(" ", "-") for key in PEAK_FLOPS)
    raise ConfigError(f"--gpu {name!r}: unknown; choose from {choices}")


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the plan needs of a model, read off the real model built on the meta device."""

    parameters: int  # sum(p.numel()), tied tensors once (as `ehrfm models --params`)
    layers: int
    hidden_size: int
    flops_per_token: float  # training FLOPs per token slot at the plan's context (pretrain.metrics)


def model_facts(architecture: str, size: str, vocab_size: int, context_length: int, **overrides) -> ModelFacts:
    """:class:`ModelFacts` of the registry's model (``overrides``: HF config fields over the preset)."""
    from ..pretrain.metrics import flops_per_token
    from ..pretrain.models import build_meta_model

    model = build_meta_model(architecture, size, vocab_size=vocab_size, **overrides)
    return ModelFacts(
        parameters=sum(p.numel() for p in model.parameters()),
        layers=model.config.num_hidden_layers,
        hidden_size=model.config.hidden_size,
        flops_per_token=flops_per_token(model, context_length),
    )


def activation_bytes(
    rows: int, context: int, layers: int, hidden: int, vocab: int, checkpointing: bool = False
) -> float:
    """Activations kept for the backward pass of one micro-step on one GPU, in bytes: ``34 d`` per token per
    layer (with activation checkpointing: each layer's 2 d-byte bf16 input plus one layer recomputed), plus the
    logits (``6 V`` per token)."""
    per_layer = CONSTANTS["activation_bytes_per_layer_hidden"].value * hidden
    per_token = (2 * hidden * layers + per_layer) if checkpointing else per_layer * layers
    return rows * context * (per_token + CONSTANTS["logit_bytes_per_vocab"].value * vocab)


def plan(inputs: PlanInputs) -> dict:
    """The plan as a JSON-able dict: inputs, model, results {name: Quantity}, memory per GPU per engine and the
    constants used."""
    inputs.validate()
    c = CONSTANTS
    gpu_name, peak = gpu_peak(inputs.gpu)
    peak_c = Constant(peak, "FLOP/s", "assumed", f"vendor dense bf16 peak of the {gpu_name} (pretrain.metrics)")
    mfu = c["mfu"] if inputs.mfu is None else Constant(inputs.mfu, "", "assumed", "given (--mfu)")
    facts = model_facts(
        inputs.architecture, inputs.size, inputs.vocab_size, inputs.context_length, **inputs.model_overrides
    )
    counted = Quantity(facts.parameters, "parameters", "measured", "sum(p.numel()) of the model (meta device)")
    fpt = Quantity(
        facts.flops_per_token,
        "FLOP/token",
        "assumed",
        "pretrain.metrics.flops_per_token: 6 x matmul parameters (head included) + attention term",
    )

    corpus_tokens = inputs.patients * inputs.tokens_per_patient
    events = corpus_tokens / c["tokens_per_event"].value
    fhir_bytes_per_event = c["fhir_bytes_per_patient"].value / c["fhir_events_per_patient"].value
    slots_per_step = inputs.batch_size * inputs.context_length * inputs.gpus * inputs.grad_accum
    fraction = c["packed_real_token_fraction"]
    real_per_step = slots_per_step * fraction.value
    steps_per_epoch = math.ceil(corpus_tokens / real_per_step)
    total_steps = math.ceil(steps_per_epoch * inputs.epochs)
    flops = facts.flops_per_token * slots_per_step * total_steps
    sustained = peak * mfu.value
    gpu_hours = flops / sustained / 3600
    gpu_tokens_per_s = sustained / facts.flops_per_token * fraction.value  # real tokens/s one GPU consumes
    loader = c["loader_tokens_per_s"]
    ref = model_facts(*CPU_REFERENCE[:2], inputs.vocab_size, CPU_REFERENCE[2])
    cpu_rate = c["cpu_small_llama_512_tokens_per_s"]
    cpu_hours = corpus_tokens * inputs.epochs * facts.flops_per_token / (cpu_rate.value * ref.flops_per_token) / 3600
    shards = c["shard_bytes_per_token"]
    results = {
        "fhir_input": derived(
            events * fhir_bytes_per_event / 1e9,
            "GB",
            "N T / tokens_per_event x fhir_bytes_per_patient / fhir_events_per_patient",
            c["tokens_per_event"],
            c["fhir_bytes_per_patient"],
            c["fhir_events_per_patient"],
        ),
        "prepared_shards": derived(corpus_tokens * shards.value / 1e9, "GB", "N T x shard_bytes_per_token", shards),
        "prepared_events_fhir_only": derived(
            events * c["events_bytes_per_event"].value / 1e9,
            "GB",
            "N T / tokens_per_event x events_bytes_per_event (events/ folder, FHIR input only)",
            c["tokens_per_event"],
            c["events_bytes_per_event"],
        ),
        "prepare_time_fhir": derived(
            events / c["fhir_events_per_s"].value / 3600,
            "hours",
            "N T / tokens_per_event / fhir_events_per_s (one process)",
            c["tokens_per_event"],
            c["fhir_events_per_s"],
        ),
        "prepare_time_meds": derived(
            events / c["meds_events_per_s"].value / 3600,
            "hours",
            "N T / tokens_per_event / meds_events_per_s (one process)",
            c["tokens_per_event"],
            c["meds_events_per_s"],
        ),
        "parameters": counted,
        "flops_per_token": fpt,
        "token_slots_per_step": Quantity(slots_per_step, "tokens", "measured", "B C G A (the inputs)"),
        "real_tokens_per_step": derived(real_per_step, "tokens", "B C G A x packed_real_token_fraction", fraction),
        "steps_per_epoch": derived(steps_per_epoch, "steps", "ceil(N T / real tokens per step)", fraction),
        "total_steps": derived(total_steps, "steps", "ceil(steps per epoch x epochs)", fraction),
        "training_flops": derived(flops, "FLOP", "flops_per_token x token slots per step x total steps", fpt),
        "gpu_hours": derived(gpu_hours, "GPU-hours", "training FLOPs / (peak x mfu) / 3600", fpt, peak_c, mfu),
        "wall_clock_hours": derived(gpu_hours / inputs.gpus, "hours", "GPU-hours / G", fpt, peak_c, mfu),
        "gpu_real_tokens_per_s": derived(
            gpu_tokens_per_s,
            "real tokens/s",
            "peak x mfu / flops_per_token x packed_real_token_fraction, per GPU",
            fpt,
            peak_c,
            mfu,
            fraction,
        ),
        "loader_processes_per_gpu": derived(
            math.ceil(gpu_tokens_per_s / loader.value),
            "processes",
            "ceil(GPU real tokens/s / loader_tokens_per_s): data.num_workers to keep one GPU fed",
            fpt,
            peak_c,
            mfu,
            loader,
        ),
        "cpu_hours_2_cores": derived(
            cpu_hours,
            "hours",
            "N T x epochs x flops_per_token / (cpu_small_llama_512_tokens_per_s x Small Llama's FLOPs per "
            "token at C=512) / 3600, on one 2-core CPU like this project's",
            fpt,
            cpu_rate,
        ),
    }
    acts = activation_bytes(
        inputs.batch_size,
        inputs.context_length,
        facts.layers,
        facts.hidden_size,
        inputs.vocab_size,
        inputs.activation_checkpointing,
    )
    memory = {}
    for engine in inputs.engines:
        parts = ENGINE_STATE[engine].bytes_per_gpu(facts.parameters, inputs.gpus)
        parts["activations"] = acts
        memory[engine] = {f"{part}_gib": value / GIB for part, value in parts.items()}
        memory[engine]["total_gib"] = sum(parts.values()) / GIB
    return {
        "inputs": {**dataclasses.asdict(inputs), "corpus_tokens": corpus_tokens, "gpu_name": gpu_name},
        "model": dataclasses.asdict(facts),
        "results": {name: dataclasses.asdict(q) for name, q in results.items()},
        "memory_per_gpu": {
            "kind": "assumed",
            "basis": f"{STATE_SOURCE}; activations B C d (34 L) bytes, B C d (2 L + 34) with activation "
            "checkpointing, + logits B C V 6 bytes",
            "engines": memory,
        },
        "constants": {
            **{name: dataclasses.asdict(const) for name, const in c.items()},
            "peak_flops": dataclasses.asdict(peak_c),
        },
    }


def _fmt(value: float) -> str:
    """Three significant digits, thousands separated: 1,234,567 / 123 / 12.3 / 1.23 / 0.0123 / 1.23e+15."""
    size = abs(value)
    if size >= 1e12:
        return f"{value:.3g}"
    if size >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.3g}"


def render(result: dict) -> str:
    """The plan as a readable table."""
    i, m = result["inputs"], result["model"]
    lines = [
        f"ehrfm plan: {i['architecture']} {i['size']} ({m['parameters'] / 1e6:.2f} M parameters at vocabulary "
        f"{i['vocab_size']}, {m['layers']} layers x {m['hidden_size']}) on {i['gpus']} x {i['gpu_name']}",
        f"corpus: {i['patients']:,} patients x {_fmt(i['tokens_per_patient'])} tokens = "
        f"{_fmt(i['corpus_tokens'])} tokens, {_fmt(i['epochs'])} epoch(s); context {i['context_length']}, "
        f"{i['batch_size']} rows per GPU per micro-step, grad_accum {i['grad_accum']}, activation "
        f"checkpointing {'on' if i['activation_checkpointing'] else 'off'}",
        "",
        f"{'quantity':26s} {'value':>10s} {'unit':14s} {'kind':9s} basis",
    ]
    for name, q in result["results"].items():
        lines.append(f"{name:26s} {_fmt(q['value']):>10s} {q['unit']:14s} {q['kind']:9s} {q['basis']}")
    mem = result["memory_per_gpu"]
    lines += ["", f"memory per GPU (GiB, {mem['kind']}): {mem['basis']}"]
    lines.append(f"{'engine':16s} {'weights':>8s} {'grads':>8s} {'AdamW':>8s} {'activ.':>8s} {'total':>8s}")
    for engine, parts in mem["engines"].items():
        values = (parts[k] for k in ("weights_gib", "grads_gib", "optimizer_gib", "activations_gib", "total_gib"))
        lines.append(f"{engine:16s} " + " ".join(f"{v:8.3f}" for v in values))
    lines += ["", "constants:"]
    for name, const in result["constants"].items():
        lines.append(
            f"  {name:34s} {_fmt(const['value']):>10s} {const['unit']:14s} {const['kind']:9s} {const['source']}"
        )
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="size a pretraining run on paper: disk, prepare time, steps, memory per GPU, GPU-hours",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--patients", type=int, required=True, help="patients pretraining reads (the pretrain split)")
    p.add_argument("--tokens-per-patient", type=float, required=True, help="mean tokens per patient")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the run (all nodes)")
    p.add_argument("--model", choices=ARCHITECTURE_NAMES, default=None, help="backbone (default: pretrain's)")
    p.add_argument("--size", choices=SIZE_NAMES, default=None, help="preset (default: pretrain's)")
    p.add_argument("--engine", nargs="+", choices=STRATEGIES, default=list(STRATEGIES), help="engines to size")
    p.add_argument("--context", type=int, default=None, help="tokens per row (data.context_length)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per GPU per micro-step (data.batch_size)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (train.grad_accum)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the corpus (default 1)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 4470: 003's, ehrfm's default)")
    p.add_argument("--gpu", default="h100", help="GPU of pretrain.metrics.PEAK_FLOPS: h100, h200, a100, ...")
    p.add_argument("--mfu", type=float, default=None, help="assumed model FLOP utilisation (default 0.40)")
    p.add_argument("--config", default=None, help="YAML of PretrainConfig (as `ehrfm pretrain --config`)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the plan as JSON to this file")
    p.add_argument(
        "overrides", nargs="*", help="key=value PretrainConfig overrides (train.activation_checkpointing=true)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..outputs import write_json_atomic
    from ..pretrain.cli_train import load_pretrain_config, shorthand_overrides
    from ..pretrain.models.configuration import DEFAULT_VOCAB_SIZE
    from ..pretrain.train import model_overrides

    shorthand = shorthand_overrides(
        (args.model, "model.architecture"),
        (args.size, "model.size"),
        (args.context, "data.context_length"),
        (args.batch_size, "data.batch_size"),
        (args.grad_accum, "train.grad_accum"),
    )
    cfg = load_pretrain_config(args.config, shorthand + list(args.overrides))
    inputs = PlanInputs(
        patients=args.patients,
        tokens_per_patient=args.tokens_per_patient,
        gpus=args.gpus,
        architecture=cfg.model.architecture,
        size=cfg.model.size,
        vocab_size=args.vocab or DEFAULT_VOCAB_SIZE,
        context_length=cfg.data.context_length,
        batch_size=cfg.data.batch_size,
        grad_accum=cfg.train.grad_accum,
        epochs=args.epochs,
        gpu=args.gpu,
        activation_checkpointing=cfg.train.activation_checkpointing,
        engines=tuple(args.engine),
        mfu=args.mfu,
        model_overrides=model_overrides(cfg),
    )
    result = plan(inputs)
    print(render(result))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json_out, result)
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0

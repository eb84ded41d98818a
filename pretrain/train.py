"""The pretraining loop: ``run(cfg) -> exit code``.

One optimizer step = ``grad_accum`` micro-batches of ``data.batch_size`` rows per rank. The logged loss is
the mean over micro-steps and ranks of each micro-batch's mean loss (what the gradient averages). Seeds:
model init uses ``train.seed`` on every rank (identical replicas); afterwards each rank's RNG (dropout) is
re-seeded from (seed, rank); MLM masks are a pure function of (seed, step, rank, micro-step). Together with
the checkpointed RNG and loader states this makes a CPU resume bit-identical to an uninterrupted run.

Exit codes: 0 done (max_steps or early stop), 75 (``PREEMPTION_EXIT_CODE``) preempted by SIGTERM/SIGUSR1
after finishing the step and writing a checkpoint -- re-run the same command to resume; 2 an expected error
(:class:`ehrfm.errors.EhrfmError`), among them :class:`TrainingDivergedError`.

Non-finite guard: a step whose loss or gradient norm (any rank) is NaN/inf, or a validation loss that is,
stops the run at once with :class:`TrainingDivergedError`; nothing of that step is checkpointed (the last
checkpoint written stays ``latest``). There is no skip budget: on EHR corpora a non-finite loss has meant bad
input or a broken checkpoint, never a transient overflow worth stepping over (bf16 needs no loss scaling).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from ..callbacks import Checkpointing, LogTrainRecords, Preemption, Throughput, Validation, fault_injection_from_env
from ..config import ConfigError, save_config, to_dict
from ..data_shards.reference_ppl import for_data_dir, reference_for
from ..data_shards.schema import SPECIAL_TOKENS
from ..data_shards.shards import read_manifest
from ..data_shards.stream import EhrDataLoader, PatientStream, StreamConfig
from ..errors import EhrfmError
from ..logging import get_logger
from ..loop import Loop
from ..metrics_log import MetricsLogger
from ..outputs import claim_run_dir, write_text_atomic
from ..seeding import derive_seed, seed_everything
from . import checkpoint as ckpt
from .config import PretrainConfig
from .curves import plot_validation_curves
from .metrics import flops_per_token, peak_flops, validation_summary
from .objectives import Objective, dense_aux
from .parallel import DistInfo, autocast_context, build_engine, describe_engine, init_distributed, lr_at

log = get_logger(__name__)


class TrainingDivergedError(EhrfmError, RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped without checkpointing that step."""


def build_model_for(cfg: PretrainConfig, vocab_size: int) -> torch.nn.Module:
    """The pretraining head model, freshly initialised from ``train.seed`` (same weights on every rank)."""
    from .models import build_model

    torch.manual_seed(cfg.train.seed)
    overrides = model_overrides(cfg)
    if cfg.model.architecture == "cehrbert" and "visit_type_token_ids" not in overrides:
        overrides["visit_type_token_ids"] = cehrbert_visit_types(Path(cfg.data.path))
    return build_model(cfg.model.architecture, cfg.model.size, head=True, vocab_size=vocab_size, **overrides)


def cehrbert_visit_types(data_dir: Path) -> list[int]:
    """CEHR-BERT's visit-type classes: the visit-type codes of the data's vocabulary (none: MLM only)."""
    from .objectives import visit_type_token_ids

    tokens = json.loads((data_dir / "tokenizer" / "ehrfm_vocab.json").read_text())["tokens"]
    ids = visit_type_token_ids(tokens)
    if not ids:
        log.warning("cehrbert: no visit-type codes in the vocabulary; visit-type prediction is off (MLM only)")
    return ids


def model_overrides(cfg: PretrainConfig) -> dict:
    """``model.overrides`` with values typed: ``model.overrides.hidden_size=32`` arrives as the string "32"."""
    overrides = cfg.model.overrides
    if isinstance(overrides, str):
        overrides = yaml.safe_load(overrides) or {}
    return {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in overrides.items()}


def stream_config(cfg: PretrainConfig, infinite: bool) -> StreamConfig:
    return StreamConfig.from_settings(cfg.data, seed=cfg.train.seed, infinite=infinite)


def first_code_id(data_dir: Path) -> int:
    """Ids below are special and task tokens (never MLM replacements)."""
    vocab = json.loads((Path(data_dir) / "tokenizer" / "ehrfm_vocab.json").read_text())
    return len(SPECIAL_TOKENS) + len(vocab.get("task_tokens", []))


def _private_generator() -> torch.Generator:
    # torch's DataLoader draws its base seed from the global RNG whenever an iterator starts; a private
    # generator keeps the global stream (dropout) independent of when loaders are (re)created.
    return torch.Generator().manual_seed(0)


def _all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=op)
    return values


class Trainer:
    def __init__(self, cfg: PretrainConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.out)
        self.data_dir = Path(cfg.data.path)
        manifest = read_manifest(self.data_dir)
        self.manifest = manifest
        seed_everything(cfg.train.seed, deterministic=cfg.train.deterministic)
        module = build_model_for(cfg, manifest["vocab_size"])
        self.flops_per_token = flops_per_token(module, cfg.data.context_length)
        self.engine = build_engine(cfg, module, info)
        seed_everything(derive_seed(cfg.train.seed, "rank", info.rank), deterministic=cfg.train.deterministic)
        aux = {}
        if cfg.dense.enabled:
            aux["dense"] = dense_aux(cfg.dense, group=dist.group.WORLD if info.world_size > 1 else None)
        self.objective = Objective(
            cfg.model.architecture,
            module,
            seed=cfg.train.seed,
            rank=info.rank,
            mlm_probability=cfg.train.mlm_probability,
            plm_probability=cfg.train.plm_probability,
            first_code_id=first_code_id(self.data_dir),
            aux_losses=aux,
        )
        self.loader = EhrDataLoader(
            PatientStream(
                self.data_dir,
                cfg.data.train_split,
                stream_config(cfg, True),
                rank=info.rank,
                world_size=info.world_size,
            ),
            num_workers=cfg.data.num_workers,
            generator=_private_generator(),
        )
        self.data_identity = ckpt.data_identity(self.data_dir, manifest)
        self.state = ckpt.TrainerState(
            data=self.data_identity,
            strategy=cfg.train.strategy,
            world_size=info.world_size,
            schedule={
                "lr": cfg.optim.lr,
                "warmup_fraction": cfg.optim.warmup_fraction,
                "schedule": cfg.optim.schedule,
                "total_steps": cfg.train.max_steps,
                "min_lr_ratio": cfg.optim.min_lr_ratio,
            },
        )
        self.config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        # count-model perplexities on the validation split, logged beside val_ppl (data_shards.reference_ppl)
        self.reference = reference_for(for_data_dir(self.data_dir, manifest), causal=self.objective.causal)

    # -- resume -----------------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        path = ckpt.agree_on_resume_checkpoint(self.run_dir) if self.cfg.checkpoint.resume else None
        if path is None:
            return
        ckpt.check_data_identity(path, ckpt.read_state(path), self.data_identity)
        saved = yaml.safe_load((path / "config.yaml").read_text())
        now = yaml.safe_load(self.config_yaml)
        changed = _diff(saved, now)
        if changed and self.info.rank == 0:
            log.warning("resuming %s with a changed config: %s", path, changed)
        state = ckpt.load_checkpoint(path, self.engine)
        self.loader.load_state_dict([r["loader"] for r in state.ranks])
        state.ranks = []
        state.strategy, state.world_size = self.cfg.train.strategy, self.info.world_size
        state.data = self.data_identity
        self.state = state
        if self.info.rank == 0:
            _truncate_metrics(self.run_dir, state.step)
            log.info("resumed from %s (step %d)", path, state.step)

    # -- one optimizer step -----------------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches of ``batches``; returns its training record
        (losses averaged over ranks, token counts summed) and advances the state's micro-step and token
        counters (the loop counts the step)."""
        cfg, engine = self.cfg, self.engine
        accum = cfg.train.grad_accum
        engine.train(True)
        totals = {"loss": 0.0, "real": 0, "slots": 0}
        aux_logs: dict[str, float] = {}
        for micro in range(accum):
            raw = next(batches)
            totals["real"] += int(raw["attention_mask"].sum())
            totals["slots"] += raw["attention_mask"].numel()
            batch = self.objective.prepare(raw, self.state.step, micro, self.info.device)
            last = micro == accum - 1
            with engine.accumulate(last):
                with autocast_context(cfg, self.info.device):
                    loss, logs = self.objective(engine.model, batch)
                engine.backward(loss, last)
            totals["loss"] += float(loss.detach()) / accum
            for key, value in logs.items():
                if key != "loss/objective":
                    aux_logs[key] = aux_logs.get(key, 0.0) + float(value) / accum
        lr = lr_at(self.state.step, cfg)
        grad_norm = engine.step(lr)
        keys = sorted(aux_logs)
        finite = math.isfinite(totals["loss"]) and (grad_norm is None or math.isfinite(grad_norm))
        vector = torch.tensor(
            [totals["loss"], totals["real"], totals["slots"], float(self.preemption.requested), float(not finite)]
            + [aux_logs[k] for k in keys],
            dtype=torch.float64,
            device=self.info.device,  # collectives run on the rank's device (NCCL: CUDA only)
        )
        flags = _all_reduce(vector[3:5].clone(), dist.ReduceOp.MAX)
        if flags[1].item():
            raise TrainingDivergedError(
                f"step {self.state.step + 1}: non-finite training loss or gradient norm (this rank: loss {totals['loss']}, "
                f"grad norm {grad_norm}); stopped without checkpointing it. Check the data and the learning rate, and "
                f"the last checkpoint {ckpt.latest_checkpoint(self.run_dir)}"
            )
        flag = flags[0:1]
        vector = _all_reduce(vector)
        world = self.info.world_size
        record = {
            "loss": vector[0].item() / world,
            "lr": lr,
            "grad_norm": grad_norm,
            "real_tokens": int(vector[1].item()),
            "padded_tokens": int(vector[2].item()),
            "pad_fraction": 1.0 - vector[1].item() / max(1.0, vector[2].item()),
        }
        record.update({k: vector[5 + i].item() / world for i, k in enumerate(keys)})
        record["preempt"] = bool(flag.item())  # the ranks' verdict, read by the Preemption callback
        self.state.micro_steps += accum
        self.state.tokens_seen += record["real_tokens"]
        return record

    # -- validation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Mean target loss over a finite pass of the validation split (all ranks; summed token losses), and
        the perplexity on clinical-code targets alone (``val_code_ppl``, read against the ``codes`` references
        of ``data_shards.reference_ppl``)."""
        cfg, engine = self.cfg, self.engine
        stream = PatientStream(
            self.data_dir,
            cfg.data.val_split,
            stream_config(cfg, False),
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        it = iter(EhrDataLoader(stream, num_workers=0, generator=_private_generator()))
        engine.train(False)
        device = self.info.device
        total = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, targets, code loss sum, code targets
        first = None
        i = 0
        while True:
            raw = next(it, None) if (not cfg.train.val_max_batches or i < cfg.train.val_max_batches) else None
            more = _all_reduce(torch.tensor([float(raw is not None)], device=device), dist.ReduceOp.MAX)
            if more.item() == 0:
                break
            weight = 1.0
            if raw is None:  # this rank is done; sharded engines still need its forward in every collective
                raw, weight = (first if first is not None else self._stand_in_val_batch()), 0.0
            first = first if first is not None else raw
            batch = self.objective.prepare(raw, 0, i, device, split="val")
            with autocast_context(cfg, device):
                sums = self.objective.validation_sums(engine.model, batch)
            if weight:
                total += sums
            i += 1
        total = _all_reduce(total).cpu()
        val_loss = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
        code_loss = (total[2] / total[3]).item() if total[3] > 0 else float("nan")
        if total[1] > 0 and not math.isfinite(val_loss):
            raise TrainingDivergedError(
                f"step {self.state.step}: validation loss is {val_loss}; stopped without checkpointing"
            )
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_targets": int(total[1].item()),
            "val_code_ppl": math.exp(min(code_loss, 50.0)) if math.isfinite(code_loss) else float("nan"),
            **self.reference,
        }

    def _stand_in_val_batch(self) -> dict:
        """A validation batch for a rank whose shard of the split is empty (more ranks than validation
        patients or shards): its forward keeps the collectives of sharded engines in step, its loss weighs 0."""
        stream = PatientStream(
            self.data_dir, self.cfg.data.val_split, stream_config(self.cfg, False), rank=0, world_size=1
        )
        return next(iter(EhrDataLoader(stream, num_workers=0, generator=_private_generator())))

    def save(self, best: bool = False) -> None:
        ckpt.save_checkpoint(
            self.run_dir,
            self.engine,
            self.state,
            loader_state=self.loader.state_dict(),
            config_yaml=self.config_yaml,
            keep=self.cfg.checkpoint.keep,
            best=best,
        )

    @torch.no_grad()
    def save_probe(self) -> None:
        """A validation batch and the training model's logits on it (``RUN/probe.safetensors``), so that an
        export can be checked against the model that was trained."""
        from safetensors.torch import save_file

        stream = PatientStream(
            self.data_dir,
            self.cfg.data.val_split,
            stream_config(self.cfg, False),
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        raw = next(iter(EhrDataLoader(stream, generator=_private_generator())))
        batch = self.objective.prepare(raw, 0, 0, self.info.device, split="probe")
        self.engine.train(False)
        out = self.engine.model(**batch)
        if self.info.rank == 0:
            tensors = {f"batch.{k}": v.detach().cpu().contiguous() for k, v in batch.items()}
            tensors["logits"] = out.logits.detach().float().cpu().contiguous()
            save_file(tensors, str(self.run_dir / "probe.safetensors"))

    # -- loop -------------------------------------------------------------------------------------------
    def callbacks(self, sink: MetricsLogger) -> list:
        """The run's rules, in the order they apply after each step (``ehrfm.callbacks``)."""
        cfg = self.cfg
        return [
            self.preemption,
            Throughput(self.flops_per_token, peak_flops(cfg.train.peak_flops), self.info.world_size),
            LogTrainRecords(sink, cfg.train.log_every),
            *fault_injection_from_env(),
            Validation(
                lambda loop: self.validate(),
                score="val_loss",
                every_steps=cfg.train.val_every,
                at_last_step=True,
                patience=cfg.train.patience,
                sink=sink,
            ),
            Checkpointing(lambda best: self.save(best=best), cfg.checkpoint.every),
        ]

    def fit(self) -> int:
        cfg, info = self.cfg, self.info
        engine_info = describe_engine(self.engine)
        self.maybe_resume()  # first: a refused resume (integrity, data identity) leaves the run folder as it was
        ckpt.barrier()  # every rank has checked the run folder (run()) before rank 0 claims it
        if info.rank == 0:
            claim_run_dir(self.run_dir, "pretrain", inputs=run_inputs(cfg))
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "engine.json").write_text(json.dumps(engine_info, indent=2))
            log.info("engine: %s", engine_info)
        sink = MetricsLogger(
            self.run_dir,
            enabled=info.rank == 0,
            total_steps=cfg.train.max_steps,
            start_step=self.state.step,
            progress=cfg.train.progress_bar,
            desc="pretrain",
            describe_validation=lambda r: f"val_loss {r['val_loss']:.4f} {validation_summary(r)}",
        )
        self.preemption = Preemption()
        loop = Loop(self.state, self.train_step, self.callbacks(sink), max_steps=cfg.train.max_steps)
        batches = iter(self.loader)
        exit_code = loop.fit(lambda epoch: batches)
        if exit_code == 0 and cfg.train.save_probe:
            self.save_probe()
        if exit_code == 0 and info.rank == 0:
            self._compare_with_references()
            plot_validation_curves(
                {f"{cfg.model.architecture}-{cfg.model.size}": self.run_dir},
                self.run_dir / "val_ppl.png",
                title=str(self.run_dir),
            )
        return exit_code

    def _compare_with_references(self) -> None:
        """Warn when the best validation perplexity does not beat the count-model reference."""
        if not self.state.val_history or not self.reference:
            return
        best = min(math.exp(min(v["val_loss"], 50.0)) for v in self.state.val_history)
        name = "ref_bigram_ppl" if "ref_bigram_ppl" in self.reference else "ref_unigram_ppl"
        if best >= self.reference[name]:
            log.warning(
                "best validation perplexity %.2f is not below the %s model's %.2f: the model has not learned "
                "more than token counts (train longer, raise the learning rate, or check the data)",
                best,
                name[4:-4],
                self.reference[name],
            )
        else:
            log.info(
                "best validation perplexity %.2f; references: %s",
                best,
                ", ".join(f"{k[4:-4]} {v:.2f}" for k, v in self.reference.items()),
            )


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after the resumed step (they belong to work the crash lost and will be redone)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def run_inputs(cfg: PretrainConfig) -> list:
    """Folders and files a run reads: its ``--out`` may contain none of them (:mod:`ehrfm.outputs`)."""
    return [cfg.data.path, cfg.accelerate_config, cfg.deepspeed.config_file]


def run(cfg: PretrainConfig) -> int:
    """Train (or resume) the run in ``cfg.out``; returns the process exit code."""
    if not cfg.data.path or not cfg.out:
        raise ConfigError("pretraining needs data.path (--data) and out (--out)")
    # every rank checks before any rank writes: a foreign or input-containing --out fails on all of them alike
    claim_run_dir(Path(cfg.out), "pretrain", inputs=run_inputs(cfg), write=False)
    read_manifest(Path(cfg.data.path))
    info = init_distributed()
    code = Trainer(cfg, info).fit()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return code

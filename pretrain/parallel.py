"""Parallelism is applied here, never inside the model (torchtitan style).

``init_distributed`` brings up the process group through Accelerate (``PartialState`` reads the torchrun /
SLURM environment; a plain single process gets a 1-rank gloo group so that DCP, FSDP and DeepSpeed behave
the same everywhere). ``build_engine`` wraps the HF model for a strategy and owns the optimizer:

    ddp              torch DistributedDataParallel (no wrapper for one rank)
    fsdp             torch FSDP2: ``fully_shard`` on every block, then on the root
    deepspeed-zero2  ``deepspeed.initialize`` with ZeRO stage 2 (optimizer + gradients partitioned)
    deepspeed-zero3  ZeRO stage 3 (parameters partitioned too)

Accelerate's own wrappers are not used for the engines: with ``cpu=True`` it silently falls back to DDP for
FSDP/DeepSpeed plugins, so the real engine is applied here and the tests assert which wrapper the model got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..devices import autocast, bf16_enabled, use_fast_attention
from ..logging import get_logger

log = get_logger(__name__)


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise (once) the default process group: NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:  # plain `ehrfm pretrain`: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if not dist.is_initialized():  # Accelerate leaves a single process without a group
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(state.process_index, state.num_processes, local_rank, device)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of any backbone: the longest ``nn.ModuleList`` in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks")
    return max(lists, key=len)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not on biases, norms, Time2Vec vectors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup then linear / cosine / constant.
    Stateless, so resuming needs only the step."""
    o, total = cfg.optim, cfg.train.max_steps
    warmup = max(1, int(round(o.warmup_fraction * total))) if o.warmup_fraction > 0 else 0
    if step < warmup:
        return o.lr * (step + 1) / warmup
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape)


def uses_bf16(cfg, device: torch.device) -> bool:
    """``ehrfm.devices.bf16_enabled`` for ``train.precision``."""
    return bf16_enabled(cfg.train.precision, device)


def autocast_context(cfg, device: torch.device):
    """``ehrfm.devices.autocast`` for ``train.precision``."""
    return autocast(cfg.train.precision, device)


def fsdp_precision(cfg, device: torch.device, root: bool):
    """FSDP2's mixed-precision policy: bf16 parameters and fp32 gradient reduction per ``uses_bf16``.

    The root keeps its forward inputs as given (``cast_forward_inputs=False``): the EHR attribute streams are
    float (``times`` in weeks since 1970, ~2,870; ``ages`` in years) and bf16's 8-bit mantissa would round them
    to multiples of 16 weeks and whole years. Blocks cast their (hidden-state) inputs to bf16 as usual."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not uses_bf16(cfg, device):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=not root)


class Engine:
    """A wrapped model with its optimizer. ``model`` is what the loop calls; ``module`` the plain HF model.

    Per optimizer step: for each micro-step ``with engine.accumulate(last): loss = ...; engine.backward(loss)``
    then ``grad_norm = engine.step(lr)``."""

    kind = "plain"

    def __init__(self, module: nn.Module, model: nn.Module, optimizer, cfg) -> None:
        self.module, self.model, self.optimizer, self.cfg = module, model, optimizer, cfg
        self.grad_accum = cfg.train.grad_accum

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.grad_accum).backward()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)


class DDPEngine(Engine):
    kind = "ddp"

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.model.no_sync()


class FSDPEngine(Engine):
    kind = "fsdp"

    def accumulate(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()


class DeepSpeedEngine(Engine):
    """DeepSpeed does its own accumulation (loss scaling by 1/gas, boundary detection), clipping and step."""

    kind = "deepspeed"

    def __init__(self, module, model, optimizer, cfg, owns_lr: bool) -> None:
        super().__init__(module, model, optimizer, cfg)
        self.owns_lr = owns_lr

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.backward(loss)
        if not last:
            self.model.step()  # not a boundary: DeepSpeed only accumulates

    def step(self, lr: float) -> float | None:
        """None when DeepSpeed does not report the norm of this step (the non-finite guard then checks the loss)."""
        if self.owns_lr:
            for group in self.model.optimizer.param_groups:
                group["lr"] = lr
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else None


def deepspeed_config(cfg, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed JSON: the user's file as-is, with missing or "auto" keys filled from our config."""
    user = json.loads(Path(cfg.deepspeed.config_file).read_text()) if cfg.deepspeed.config_file else {}
    stage = 3 if cfg.train.strategy == "deepspeed-zero3" else 2
    bf16 = uses_bf16(cfg, device)
    ours = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.offload_optimizer:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        # DeepSpeed >= 0.14 refuses a client (torch) optimizer next to an offloaded one unless told: the fp32
        # masters then live on the CPU and torch AdamW (foreach) updates them there. DeepSpeed's own
        # DeepSpeedCPUAdam (a C++ extension built on first use) is faster: name an "optimizer" block in
        # deepspeed.config_file and it is used instead.
        ours["zero_force_ds_cpu_optimizer"] = False

    def fill(user_node: dict, our_node: dict) -> dict:
        merged = dict(user_node)
        for key, value in our_node.items():
            if key not in merged or merged[key] == "auto":
                merged[key] = value
            elif isinstance(value, dict) and isinstance(merged[key], dict):
                merged[key] = fill(merged[key], value)
        return merged

    merged = fill(user, ours)
    if (
        merged["train_micro_batch_size_per_gpu"] != cfg.data.batch_size
        or merged["gradient_accumulation_steps"] != cfg.train.grad_accum
    ):
        raise ValueError(
            f"DeepSpeed config {cfg.deepspeed.config_file}: micro batch {merged['train_micro_batch_size_per_gpu']} / "
            f"accumulation {merged['gradient_accumulation_steps']} disagree with data.batch_size="
            f"{cfg.data.batch_size} / train.grad_accum={cfg.train.grad_accum}; make them equal or 'auto'"
        )
    return merged


def build_engine(cfg, module: nn.Module, info: DistInfo) -> Engine:
    """Activation checkpointing, compile, then wrap ``module`` for ``cfg.train.strategy`` and build AdamW."""
    strategy = cfg.train.strategy
    module.to(info.device)
    use_fast_attention(module, info.device)  # flash varlen for packed rows where flash-attn runs
    if cfg.train.activation_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile:
        for block in transformer_blocks(module):
            block.compile()
    o = cfg.optim

    def adamw(params):
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)

    if strategy == "ddp":
        if info.world_size == 1:
            return Engine(module, module, adamw(param_groups(module, o.weight_decay)), cfg)
        ids = [info.local_rank] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return DDPEngine(module, model, adamw(param_groups(module, o.weight_decay)), cfg)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(module):
            fully_shard(block, mp_policy=fsdp_precision(cfg, info.device, root=False))
        fully_shard(module, mp_policy=fsdp_precision(cfg, info.device, root=True))
        return FSDPEngine(module, module, adamw(param_groups(module, o.weight_decay)), cfg)
    if strategy.startswith("deepspeed"):
        if info.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        ds_config = deepspeed_config(cfg, info.world_size, info.device)
        optimizer = None if "optimizer" in ds_config else adamw(param_groups(module, o.weight_decay))
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=ds_config,
            model_parameters=None if optimizer else module.parameters(),
        )
        return DeepSpeedEngine(module, engine, ds_optimizer, cfg, owns_lr="scheduler" not in ds_config)
    raise ValueError(f"unknown strategy {strategy!r}")


def describe_engine(engine: Engine) -> dict:
    """What the model really got (written to ``RUN/engine.json``; tests assert it): wrapper classes and how
    much of the parameters this rank holds locally (< 1 when sharded)."""
    module = engine.module
    full = local = 0
    for p in module.parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3 partitioned parameter
            full += p.ds_numel
            local += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):  # DTensor (FSDP2)
            full += p.numel()
            local += p.to_local().numel()
        else:
            full += p.numel()
            local += p.numel()
    info = {
        "strategy": engine.cfg.train.strategy,
        "engine": engine.kind,
        "wrapper": f"{type(engine.model).__module__}.{type(engine.model).__name__}",
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "is_ddp": isinstance(engine.model, nn.parallel.DistributedDataParallel),
        "is_fsdp2": False,
        "is_deepspeed": False,
        "zero_stage": None,
        "local_param_fraction": local / max(1, full),
        "activation_checkpointing": any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules()),
        "grad_accum": engine.grad_accum,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "attn_implementation": getattr(getattr(module, "config", None), "_attn_implementation", None),
    }
    try:
        from torch.distributed.fsdp import FSDPModule

        info["is_fsdp2"] = isinstance(module, FSDPModule)
        info["fsdp_blocks"] = sum(isinstance(b, FSDPModule) for b in transformer_blocks(module))
    except ImportError:
        pass
    if engine.kind == "deepspeed":
        import deepspeed

        info["is_deepspeed"] = isinstance(engine.model, deepspeed.DeepSpeedEngine)
        info["zero_stage"] = engine.model.zero_optimization_stage()
    return info

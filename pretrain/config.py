"""Typed configuration of `ehrfm pretrain` (YAML + ``key=value`` overrides via ``ehrfm.config``).

    cfg = load_config(PretrainConfig, "pretrain.yaml", ["optim.lr=3e-4", "dense.enabled=true"])

The resolved config is written into every checkpoint and into the run folder (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from ..config import check_range
from ..data_shards.config import StreamSettings
from .dense_loss import DenseLossConfig

Architecture = Literal["llama", "mamba", "mamba2", "bert", "xlnet", "modernbert", "bigbird", "cehrbert", "bilstm"]
Strategy = Literal["ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"]
ARCHITECTURE_NAMES = get_args(Architecture)
# "mini" is ehrfm's laptop size (demo, studies); tiny / small / medium are 003 Table 5 (models.configuration);
# "paper001" is 001 Appendix C's configuration of its comparison set (bigbird, cehrbert, bilstm, and mamba = EhrMamba)
Size = Literal["mini", "tiny", "small", "medium", "paper001"]
SIZE_NAMES = get_args(Size)
STRATEGIES = get_args(Strategy)


@dataclasses.dataclass
class ModelConfig:
    """Backbone and preset; ``overrides`` are config fields of the HF config (e.g. hidden_size, num_hidden_layers)."""

    architecture: Architecture = "llama"
    size: Size = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PretrainDataConfig(StreamSettings):
    """The prepared data folder and its splits, plus the stream settings it inherits (context_length,
    batch_size -- rows per rank per micro-step --, mode, long_sequences, shuffle_buffer, pack_window; see
    ``ehrfm.data_shards.stream``)."""

    path: str = ""
    num_workers: int = 0
    train_split: str = "pretrain"
    val_split: str = "pretrain_val"

    def validate(self) -> None:
        super().validate()
        check_range(self, "num_workers", ge=0)


@dataclasses.dataclass
class OptimConfig:
    """AdamW and the schedule: linear warmup over ``warmup_fraction`` of the steps, then linear or cosine decay
    to ``min_lr_ratio * lr``."""

    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_fraction: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping (the norm is still logged)

    def validate(self) -> None:
        from ..config import ConfigError

        check_range(self, "lr", ge=0)  # 0: a run that only evaluates (tests use it)
        check_range(self, "weight_decay", ge=0)
        check_range(self, "eps", gt=0)
        check_range(self, "warmup_fraction", ge=0, le=1)
        check_range(self, "min_lr_ratio", ge=0, le=1)
        check_range(self, "grad_clip", ge=0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: two values in [0, 1), got {list(self.betas)}")


@dataclasses.dataclass
class TrainConfig:
    """Loop, precision and parallelism.

    strategy: how the model is wrapped (``parallel.py``). precision "auto" = bf16 autocast on GPU, fp32 on CPU.
    grad_accum: micro-steps per optimizer step. val_every / log_every (and checkpoint.every) in optimizer steps.
    patience: validations without improvement before early stopping (0 = never stop early).
    mlm_probability: masked fraction for BERT and ModernBERT (80% [MASK], 10% random, 10% unchanged).
    plm_probability: fraction of tokens XLNet predicts per sequence (1/6, XLNet's and HF's default; 003 is silent).
    """

    strategy: Strategy = "ddp"
    max_steps: int = 1000
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    deterministic: bool = True
    val_every: int = 200
    val_max_batches: int = 0  # 0 = the whole validation split (a finite pass)
    patience: int = 5
    log_every: int = 1
    progress_bar: bool = True
    mlm_probability: float = 0.15
    plm_probability: float = 1 / 6
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look up the GPU name (no MFU on CPU)
    save_probe: bool = True  # after training, save a validation batch and the model's logits (export check)

    def validate(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every"):
            check_range(self, name, ge=1)
        for name in ("val_every", "val_max_batches", "patience", "peak_flops"):
            check_range(self, name, ge=0)
        check_range(self, "mlm_probability", gt=0, lt=1)
        check_range(self, "plm_probability", gt=0, lt=1)


@dataclasses.dataclass
class CheckpointConfig:
    """Sharded checkpoints every ``every`` steps (0 = only at the end), keeping the last ``keep`` (+ the best)."""

    every: int = 500
    keep: int = 2
    resume: bool = True  # resume from the latest complete checkpoint in the run folder

    def validate(self) -> None:
        check_range(self, "every", ge=0)
        check_range(self, "keep", ge=0)


@dataclasses.dataclass
class DeepSpeedConfig:
    """``config_file``: a user's DeepSpeed JSON used as-is; our values only fill its missing or "auto" keys."""

    config_file: str = ""
    offload_optimizer: bool = False


@dataclasses.dataclass
class PretrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: PretrainDataConfig = dataclasses.field(default_factory=PretrainDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    dense: DenseLossConfig = dataclasses.field(default_factory=DenseLossConfig)
    out: str = ""
    accelerate_config: str = ""  # a user's `accelerate config` YAML; see accelerate_config.py

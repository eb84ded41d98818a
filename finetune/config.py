"""Typed finetuning config (``ehrfm.config`` dataclasses: YAML + ``key=value`` overrides).

Defaults follow 003 3.4 (AdamW, lr 5e-5, batch 32, 10 epochs, patience 2, dropout 0.1) and 002 2.3 for
ALFIA / LoRA (N_f = 4 fused layers, LoRA r = 16, alpha = 16, dropout 0.05). The resolved config is written
into every finetuned model folder (``finetune.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

METHODS = ("per-task", "mpf", "alfia")


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    save: Literal["merged", "adapter"] = "merged"  # merged: full backbone; adapter: peft adapter + export path


@dataclass
class ALFIAConfig:
    num_fuse_layers: int = 4  # N_f: top hidden layers fused (002: 4); clamped to layers + embeddings
    layer_heads: int = 4  # n_h of the inter-layer attention (eqs. 3-6)
    gating: bool = True  # eq. 7 sigmoid gate; False: mean attention scores over heads (sum to 1)
    classifier_heads: int = 4  # heads of the ACH self-attention (002 Fig. 2: 4)
    dropout: float = 0.1


@dataclass
class SurvivalConfig:
    """Heads of time-to-event tasks (labels with ``time_to_event_days``; ``finetune/survival.py``): a
    piecewise-exponential or discrete-time head over ``bins`` equal bins from 0 to the task's horizon (the
    longest follow-up in its training labels). Used with ``method=per-task``."""

    head: Literal["piecewise_exponential", "discrete"] = "piecewise_exponential"
    bins: int = 8

    def validate(self) -> None:
        from ehrfm.config import check_range

        check_range(self, "bins", ge=1)


@dataclass
class ANAAConfig:
    """ANAA while finetuning (000; ``ehrfm.kernels.anaa_attention`` inside the swapped attention modules).
    ``enabled`` switches it on (flag ``--anaa``); the others are the operator's settings."""

    enabled: bool = False
    sigma_eh: float = 0.33  # event-horizon std of the smoothing kernel
    variant: Literal["causal", "symmetric"] | None = None  # None: causal for causal attention, symmetric otherwise
    mode: Literal["anaa", "rna", "smooth"] = (
        "anaa"  # rna: noise only (the paper's RNA ablation); smooth: smoothing only
    )
    sigma_norm: Literal["paper", "entries"] = "paper"
    detach_sigma: bool = True  # false: differentiate through sigma
    impl: Literal["auto", "reference", "factorized", "triton"] = "auto"
    kernel_size: int | None = None


@dataclass
class FinetuneConfig:
    method: Literal["per-task", "mpf", "alfia"] = "per-task"
    tasks: list[str] = field(default_factory=list)  # empty: every task of the data manifest
    freeze: bool = False  # backbone frozen: linear/MLP probe
    # "pretrained": the exported weights; "random": the same architecture, config and tokenizer with freshly
    # initialised weights (seeded by `seed`), the from-scratch control that shows what pretraining adds
    init: Literal["pretrained", "random"] = "pretrained"
    context_length: int = 512
    epochs: int = 10
    patience: int = 2  # epochs without a better validation AUPRC before stopping (002: 5)
    learning_rate: float = 5e-5
    head_learning_rate: float | None = None  # default: learning_rate
    weight_decay: float = 0.01
    batch_size: int = 32
    head_hidden: int | None = None  # hidden width of the two-layer head; default hidden_size
    dropout: float = 0.1
    pos_weight: str = "none"  # "none" | "auto" (negatives / positives of the training split) | a number
    train_fraction: float = 1.0  # fraction of training *patients* kept (seeded), 0 < f <= 1
    neftune_alpha: float = 0.0  # 0 = off; 001/000 Table 3 baselines use 5 and 10
    max_grad_norm: float = 1.0
    # as pretraining's train.precision (ehrfm.devices): "auto" = bf16 autocast on GPU, fp32 on CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = 42
    progress_bar: bool = True  # a tqdm bar over the optimizer steps of all epochs
    # after each epoch a checkpoint beside --out (<out>.resume/); the same command resumes there (finetune/resume.py)
    resume: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    alfia: ALFIAConfig = field(default_factory=ALFIAConfig)
    anaa: ANAAConfig = field(default_factory=ANAAConfig)
    survival: SurvivalConfig = field(default_factory=SurvivalConfig)

    def validate(self) -> None:
        """Raise ValueError naming the field for values outside their domain."""
        from ehrfm.config import ConfigError

        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {list(METHODS)}")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"train_fraction: must be in (0, 1], got {self.train_fraction}")
        if self.context_length < 2:
            raise ConfigError(f"context_length: must be >= 2, got {self.context_length}")
        from ehrfm.devices import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ConfigError("epochs, patience and batch_size must be >= 1")
        if self.pos_weight not in ("none", "auto"):
            try:
                if float(self.pos_weight) <= 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"pos_weight: 'none', 'auto' or a positive number, got {self.pos_weight!r}") from None
        if self.init == "random" and self.lora.enabled and self.lora.save == "adapter":
            raise ConfigError(
                "init=random with lora.save=adapter: an adapter is reloaded onto the pretrained weights; "
                "use lora.save=merged"
            )
        if self.lora.enabled and self.freeze:
            raise ConfigError("lora.enabled and freeze exclude each other (LoRA already freezes the base weights)")
        if self.neftune_alpha < 0:
            raise ConfigError(f"neftune_alpha: must be >= 0, got {self.neftune_alpha}")


@dataclass
class SamplingConfig:
    """How rollouts are sampled (``finetune/rollout.py``). samples: rollouts per example (K); temperature
    (0 = greedy) and top_p (nucleus mass) shape each token's distribution; max_new_tokens: the token budget of
    one rollout; batch_rows: rows (examples x samples) decoded together; seed: the sampling generator's."""

    samples: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_rows: int = 256
    seed: int = 0

    def validate(self) -> None:
        from ehrfm.config import check_range

        for name in ("samples", "max_new_tokens", "batch_rows"):
            check_range(self, name, ge=1)
        check_range(self, "temperature", ge=0)
        check_range(self, "top_p", gt=0, le=1)


@dataclass
class ForecastConfig:
    """`ehrfm forecast` (``finetune/forecast.py``). tasks: empty = every task a rollout can answer; split: the
    labels to predict; context_length: history plus rollout tokens the model sees at most (the history keeps
    its most recent ``context_length - sampling.max_new_tokens`` tokens); max_examples: label rows per task
    (0 = all); bootstrap: patient-level resamples of the metrics' CIs; precision as finetuning's."""

    tasks: list[str] = field(default_factory=list)
    split: str = "test"
    context_length: int = 512
    max_examples: int = 0
    bootstrap: int = 1000
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self) -> None:
        from ehrfm.config import ConfigError, check_range

        check_range(self, "max_examples", ge=0)
        check_range(self, "bootstrap", ge=0)
        if self.context_length - self.sampling.max_new_tokens < 8:
            raise ConfigError(
                f"context_length: {self.context_length} leaves fewer than 8 history tokens beside "
                f"sampling.max_new_tokens {self.sampling.max_new_tokens}"
            )

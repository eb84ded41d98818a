"""What the Triton kernels share on a GPU: which dtype they read operands in, and one registry of autotuners.

Operands: bf16/fp16 inputs are read as half-precision operands (products exact or rounded once, every sum
fp32); everything else as fp32. The interpreter (CPU tests) computes in numpy, which has no bfloat16 (it
returned values off by 1e9): there bf16 is read as fp32, while fp16 stays fp16 so the CPU tests cover the
half-operand casts.

Autotuners are built on a kernel's first GPU launch (:func:`autotuner`) and kept for the process;
:func:`tuned_tiles` reports what each one chose (``scripts/gpu-check``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

HALF_DTYPES = (torch.bfloat16, torch.float16)

_AUTOTUNERS: dict[str, triton.runtime.Autotuner] = {}


def operand_dtype(dtype: torch.dtype, on_gpu: bool) -> torch.dtype:
    """The dtype a kernel reads inputs of ``dtype`` in (see the module docstring)."""
    if dtype == torch.bfloat16 and not on_gpu:
        return torch.float32
    return dtype if dtype in HALF_DTYPES else torch.float32


def operand_kind(dtype: torch.dtype) -> str:
    """``"half"`` or ``"fp32"``: the candidate list a GPU launch on ``dtype`` inputs tunes over."""
    return "half" if dtype in HALF_DTYPES else "fp32"


def autotuner(
    name: str, kernel, configs: list[triton.Config], key: list[str], prune: Callable | None = None
) -> triton.runtime.Autotuner:
    """The process's autotuner of ``kernel`` under ``name``: built on first use over ``configs``, keyed on the
    arguments ``key`` (and the tensors' dtypes), ``prune`` narrowing the candidates to the launch."""
    if name not in _AUTOTUNERS:
        by = {"early_config_prune": prune} if prune else None
        _AUTOTUNERS[name] = triton.autotune(configs=configs, key=key, prune_configs_by=by)(kernel)
    return _AUTOTUNERS[name]


def tuned_tiles() -> dict[str, dict[str, str]]:
    """The configuration each autotuned kernel chose in this process, per tuning key."""
    return {name: {str(k): str(cfg) for k, cfg in tuner.cache.items()} for name, tuner in _AUTOTUNERS.items()}

"""Where models run and in which precision: one policy for pretraining, finetuning, evaluation and probing.

* device: the rank's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU;
* precision ``auto`` = bf16 autocast on GPU, fp32 on CPU; ``bf16`` / ``fp32`` force it (bf16 autocast also
  runs on CPU). Parameters stay fp32 (masters); only autocast regions compute in bf16.
"""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def compute_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def bf16_enabled(precision: str, device: torch.device) -> bool:
    """bf16 when asked (``bf16``), or by default on GPU (``auto``); otherwise fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(precision: str, device: torch.device):
    """bf16 autocast per :func:`bf16_enabled`, else a no-op (fp32)."""
    if bf16_enabled(precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with every tensor on ``device`` (non-blocking from pinned memory); other values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def preferred_attn_implementation(device: torch.device) -> str:
    """``flash_attention_2`` when flash-attn is installed and ``device`` is a CUDA GPU of compute capability 8.0
    or newer (packed rows then run as one varlen sequence, no dense mask); ``sdpa`` otherwise."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or built for another torch
        return "sdpa"
    return "flash_attention_2"


def use_fast_attention(model, device: torch.device) -> str | None:
    """Switch an attention backbone (Llama, BERT, ModernBERT; not XLNet, which has one einsum path) to :func:`preferred_attn_implementation`; returns the
    implementation now in use (None for models without attention). A user's explicit choice other than sdpa
    (e.g. eager for debugging) is kept."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if config is None or getattr(config, "model_type", "") not in ("ehr_llama", "ehr_bert", "ehr_modernbert"):
        return None
    wanted = preferred_attn_implementation(device)
    if current in (None, "sdpa") and wanted != "sdpa":
        model.set_attn_implementation(wanted)
    return model.config._attn_implementation

"""ehrfm.kernels: the numerical ops, each with a plain-PyTorch reference (the test oracle and the CPU path) and
a fast path: Triton kernels for ANAA attention and the dense losses; for the Mamba scans our PyTorch fast paths
(v1 selective scan with an explicit backward, Mamba2 chunked SSD scan) and mamba-ssm's kernels on CUDA (no
Triton kernel of ours).

Public API (imported lazily so `import ehrfm` never pulls in Triton):
    anaa_attention(q, k, v, *, sigma_eh, variant, training, ...)   -> ehrfm.kernels.anaa
    dense_losses(z, *, z_related=None, k=20, impl="auto")          -> ehrfm.kernels.dense
    effective_rank(z), condition_number(z), subspace_distance(z_a, z_b, k)
    selective_scan(...), ssd_chunk_scan(...)                        -> ehrfm.kernels.mamba_scan

This folder is only ever importable as ``ehrfm.kernels``: a top-level ``kernels`` package would be mistaken by
transformers for HF's own ``kernels`` hub package.
"""

from __future__ import annotations

import importlib

_API = {
    "anaa_attention": ".anaa",
    "dense_losses": ".dense",
    "effective_rank": ".dense",
    "condition_number": ".dense",
    "subspace_distance": ".dense",
    "selective_scan": ".mamba_scan",
    "ssd_chunk_scan": ".mamba_scan",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(_API[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

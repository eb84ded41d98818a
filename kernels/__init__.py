"""ehrfm.kernels: the numerical ops, each with a plain-PyTorch reference (the test oracle and the CPU path) and
a fast path: Triton kernels for ANAA attention and the dense losses; for the Mamba scans our PyTorch fast paths
(v1 selective scan with an explicit backward, Mamba2 chunked SSD scan) and mamba-ssm's kernels on CUDA (no
Triton kernel of ours).

Public API (imported lazily so `import ehrfm` never pulls in Triton):
    anaa_attention(q, k, v, *, sigma_eh, variant, training, ...)   -> ehrfm.kernels.anaa
    dense_losses(z, *, z_related=None, k=20, impl="auto")          -> ehrfm.kernels.dense
    effective_rank(z), condition_number(z), subspace_distance(z_a, z_b, k)
    selective_scan(...), ssd_chunk_scan(...)                        -> ehrfm.kernels.mamba_scan

This folder is only ever meant as ``ehrfm.kernels``. The top-level name ``kernels`` belongs to HF's hub-kernel
package, which transformers (>= 5.25) requires and imports. Python started in the checkout root has that root
on ``sys.path``, where this folder would shadow HF's package; reached that way, it hands the name over to the
installed package (below) instead of breaking transformers.
"""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import PathFinder
from importlib.util import module_from_spec
from pathlib import Path


def _hand_the_top_level_name_to_the_installed_package() -> None:
    """Replaces ``sys.modules["kernels"]`` (this folder, reached from the checkout root) by the ``kernels``
    package found on the rest of ``sys.path``; the import statement under way then returns that one."""
    checkout = Path(__file__).resolve().parent.parent
    rest = [entry for entry in sys.path if Path(entry or ".").resolve() != checkout]
    spec = PathFinder.find_spec("kernels", rest)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels': {Path(__file__).parent} is ehrfm.kernels, not a top-level package",
            name="kernels",
        )
    module = module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_the_top_level_name_to_the_installed_package()

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

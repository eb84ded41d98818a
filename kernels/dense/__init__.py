"""Covariance-based dense losses (paper 004, section 4) and representation metrics (Tables 1-4).

    dense_losses(z, *, z_related=None, k=20, impl="auto", group=None, distributed=False) -> {"spec", "orth"[, "sub"]}
    effective_rank(z), condition_number(z), subspace_distance(z_a, z_b, k)

z is (N, d): N embeddings of width d. See README.md in this folder for the formulas and the choices made.
"""

from __future__ import annotations

import os

import torch

from .metrics import condition_number, effective_rank, subspace_distance
from .reference import DEFAULT_EPS, dense_losses_reference, subspace_loss
from .subspace import DEFAULT_GAP_EPS

__all__ = ["dense_losses", "effective_rank", "condition_number", "subspace_distance"]

IMPLS = ("auto", "reference", "triton")


def _resolve_impl(impl: str, z: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    # "auto" stays on the reference everywhere: the Triton kernel has not been measured faster than
    # cuBLAS + elementwise on a GPU yet (no GPU in development; see README). Opt in with impl="triton".
    if impl == "triton" and z.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return "reference" if impl == "auto" else impl


def dense_losses(
    z: torch.Tensor,
    *,
    z_related: torch.Tensor | None = None,
    k: int = 20,
    impl: str = "auto",
    group=None,
    distributed: bool = False,
    eps: float = DEFAULT_EPS,
    gap_eps: float = DEFAULT_GAP_EPS,
) -> dict[str, torch.Tensor]:
    """Dense-feature losses of z (N, d): 'spec', 'orth' and, when z_related (M, d) is given, 'sub'.

    Each value is a 0-d tensor in fp32 (fp64 if z is fp64, reference only), differentiable w.r.t. z and
    z_related. `sub` compares the top-k principal subspaces of z and z_related (k <= min(N, M, d)).
    `eps` regularizes the column variances of `orth`; `gap_eps` clamps the inverse eigen-gaps of `sub`.

    With `group` (a process group) or `distributed=True` (WORLD), z is this rank's slice and the statistics
    are those of the global batch (a collective: every rank must call it). The reference implementation
    is used for that path; see `distributed.py` for the gradient convention under DDP/FSDP.
    """
    impl = _resolve_impl(impl, z)
    if group is not None or distributed:
        if impl == "triton":
            raise ValueError("impl='triton' has no distributed path; use impl='reference' or 'auto'")
        from .distributed import dense_losses_distributed

        return dense_losses_distributed(z, z_related=z_related, k=k, group=group, eps=eps, gap_eps=gap_eps)
    if impl == "reference":
        return dense_losses_reference(z, z_related=z_related, k=k, eps=eps, gap_eps=gap_eps)
    from .triton_kernel import spec_orth_triton

    spec, orth = spec_orth_triton(z, eps)
    out = {"spec": spec, "orth": orth}
    if z_related is not None:  # eigh has no Triton counterpart: the subspace term always uses torch
        out["sub"] = subspace_loss(z, z_related, k, gap_eps)
    return out

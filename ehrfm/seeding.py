"""Seeded determinism: one seed flows from the config into every random source."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices); optionally ask torch for deterministic kernels."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def derive_seed(seed: int, *keys: object) -> int:
    """A stable 63-bit seed for a named sub-stream (e.g. ``derive_seed(seed, "shuffle", epoch, rank)``).

    Uses a hash rather than ``seed + k`` so that sub-streams of neighbouring seeds never collide.
    """
    text = ":".join([str(seed), *map(str, keys)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1

"""Tile shapes of the fused ANAA kernels: the GPU autotuner's candidates and the interpreter's one tile.

A tile is ``(BM, BN, num_warps, num_stages)``: BM query rows by BN key rows. The forward and dQ kernels keep BM
query rows resident and stream key tiles; the dK/dV kernels keep BN key rows resident and stream query tiles,
so their large tile is BN.

The candidates depend on the operand dtype (``"half"``: bf16/fp16 operands with fp32 accumulation; ``"fp32"``:
tf32 tensor-core dots) and the padded head dim (64 covers every head dim up to 64, 128 up to 128). Each list
holds only tiles that compile for sm_80 (A100) and sm_90 (H100/H200) without register spills and within the
shared memory of an A100 -- chosen from ``python -m ehrfm.kernels.aot --sweep`` (the sweep is in
``kernels/anaa/README.md``) and re-checked on every CI run by ``tests/kernels/test_triton_aot.py``. On a GPU the
autotuner times the candidates of the launch's (operand dtype, head dim) once per process and keeps the
fastest. Head dims above 128 get one untuned tile.
"""

from __future__ import annotations

import torch

from ..tuning import operand_kind

Tile = tuple[int, int, int, int]  # (BM, BN, num_warps, num_stages)

INTERPRETER_TILE: Tile = (16, 16, 4, 1)
LARGE_HEAD_DIM_TILE: Tile = (16, 16, 4, 2)

# kernel -> (operand kind, head-dim class) -> candidates
GPU_TILES: dict[str, dict[tuple[str, int], list[Tile]]] = {
    "_anaa_fwd": {
        ("half", 64): [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
        ("half", 128): [(64, 32, 8, 2), (64, 16, 8, 2), (128, 16, 8, 2), (64, 32, 8, 3)],
        ("fp32", 64): [(64, 32, 8, 2), (64, 16, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
        ("fp32", 128): [(64, 32, 8, 2), (64, 16, 8, 2), (128, 32, 8, 2), (32, 32, 8, 2)],
    },
    "_anaa_noise_fwd": {
        ("half", 64): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
        ("half", 128): [(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
        ("fp32", 64): [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 4, 2)],
        ("fp32", 128): [(64, 16, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
    },
    "_anaa_bwd_dkdv": {
        ("half", 64): [(16, 64, 4, 2), (32, 64, 8, 2), (16, 64, 8, 2), (32, 64, 8, 3)],
        ("half", 128): [(32, 64, 8, 2), (16, 64, 8, 2), (32, 64, 8, 3)],
        ("fp32", 64): [(16, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
        ("fp32", 128): [(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    },
    "_anaa_noise_bwd_dv": {
        ("half", 64): [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)],
        ("half", 128): [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)],
        ("fp32", 64): [(16, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2)],
        ("fp32", 128): [(16, 64, 8, 2), (32, 64, 8, 2), (64, 64, 4, 2)],
    },
    "_anaa_bwd_dq": {
        ("half", 64): [(64, 16, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2), (128, 16, 8, 2)],
        ("half", 128): [(64, 32, 8, 2)],
        ("fp32", 64): [(64, 32, 8, 2), (64, 16, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
        ("fp32", 128): [(32, 32, 8, 2)],
    },
}
# the argument whose dtype is the operand dtype of each kernel
OPERAND_ARG = {
    "_anaa_fwd": "Q",
    "_anaa_noise_fwd": "V",
    "_anaa_bwd_dkdv": "Q",
    "_anaa_noise_bwd_dv": "DYZ",
    "_anaa_bwd_dq": "Q",
}
# the grid spans the resident tile: query tiles (BM) or key tiles (BN)
GRID_TILE = {
    "_anaa_fwd": "BM",
    "_anaa_noise_fwd": "BM",
    "_anaa_bwd_dkdv": "BN",
    "_anaa_noise_bwd_dv": "BN",
    "_anaa_bwd_dq": "BM",
}


def block_d(head_dim: int) -> int:
    """The padded head-dim tile (BD) of a launch: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def head_dim_class(block_d: int) -> int | None:
    """64 or 128 (the padded head dim's candidate class); None above 128."""
    return 64 if block_d <= 64 else 128 if block_d <= 128 else None


def gpu_candidates(kernel: str, dtype: torch.dtype, block_d: int) -> list[Tile]:
    cls = head_dim_class(block_d)
    return [LARGE_HEAD_DIM_TILE] if cls is None else GPU_TILES[kernel][(operand_kind(dtype), cls)]

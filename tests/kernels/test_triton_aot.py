"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with Triton's bundled ptxas, without spills.

For ANAA that is every autotuning candidate (``kernels/anaa/tiles.py``), per input dtype and head dim, each
within an A100's shared memory.

The interpreter (the CPU tests' path) accepts constructs the GPU compiler rejects and says nothing about
registers; this runs the real compiler (``python -m ehrfm.kernels.aot``, a subprocess without
TRITON_INTERPRET) and prints the register/spill table. Before this check, ANAA's backward dK/dV kernel with fp32
inputs (IEEE dots) spilled 520 bytes at head dim 64 and 7 KB at 128 on sm_80.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    from ehrfm.kernels.aot import ARCHS, SHARED_LIMIT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path / "triton_cache"), OMP_NUM_THREADS="1")
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ehrfm.kernels.aot", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    rows = json.loads(out.read_text())
    kernels = {r["kernel"] for r in rows}
    assert kernels == {
        "_anaa_fwd",
        "_anaa_noise_fwd",
        "_anaa_bwd_dkdv",
        "_anaa_noise_bwd_dv",
        "_anaa_bwd_dq",
        "_philox_noise_kernel",
        "_col_stats_kernel",
        "_dual_gram_kernel",
        "_dual_matmul_kernel",
        "_orth_finish_kernel",
    }
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS}
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling
    assert all(0 < r["registers"] <= 255 for r in rows)
    too_big = [r for r in rows if r["shared_bytes"] > SHARED_LIMIT[int(r["arch"][3:])]]
    assert not too_big, too_big


def test_anaa_gpu_candidates_have_large_tiles_for_bf16():
    """bf16 operands buy 64-128-row resident tiles for every ANAA kernel at head dims 64 and 128."""
    import torch

    from ehrfm.kernels.anaa import tiles

    for kernel, grid_tile in tiles.GRID_TILE.items():
        for d in (64, 128):
            resident = [t[0] if grid_tile == "BM" else t[1] for t in tiles.gpu_candidates(kernel, torch.bfloat16, d)]
            assert max(resident) >= 64, (kernel, d, resident)

"""scripts/gpu-check's checks rehearsed on CPU (Triton through the interpreter): the script must run and its
numerical checks must pass at small sizes, so that the first GPU machine runs a script that works."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_gpu_check_rehearses_its_numerical_checks_on_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ehrfm.apps.gpu_check",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--only",
            "environment,triton_kernels,mamba_scan_packed,flash_varlen,forecast_rollouts,benches",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert report["failed"] == [] and report["device"] == "cpu"
    assert checks["environment"]["torch"] and checks["environment"]["attn_implementation"] == "sdpa"
    assert checks["triton_kernels"]["status"] == "ok"
    assert set(checks["triton_kernels"]["relative_error"]["fp32"]) == {
        "anaa_d16_out",
        "anaa_d16_dq",
        "anaa_d16_dk",
        "anaa_d16_dv",
        "dense_spec",
        "dense_orth",
        "dense_dz",
    }
    assert checks["triton_kernels"]["anaa_tiles_chosen"] == checks["triton_kernels"]["dense_tiles_chosen"] == {}
    assert max(checks["triton_kernels"]["relative_error"]["fp32"].values()) < 1e-4  # IEEE dots on the interpreter
    assert checks["mamba_scan_packed"]["status"] == "ok"
    rollouts = checks["forecast_rollouts"]
    assert rollouts["status"] == "ok" and all(
        rollouts[a]["identical_share"] == 1.0 for a in ("llama", "mamba", "mamba2")
    )
    assert max(checks["mamba_scan_packed"]["relative_error"].values()) < 1e-4
    assert checks["flash_varlen"]["status"] == "skipped" and checks["benches"]["status"] == "skipped"

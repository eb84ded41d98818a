"""The `ehrfm bench mamba-scan` entry point on a tiny shape: runs both paths and they agree."""

from ehrfm.kernels.mamba_scan.bench import run


def test_bench_runs_and_both_paths_agree():
    result = run(["--size", "tiny", "--batch", "1", "--length", "16", "--repeats", "1"])
    assert result["length"] == 16 and result["hidden_size"] == 256
    assert result["fast_fwd_bwd_s"] > 0 and result["hf_reference_fwd_bwd_s"] > 0
    assert result["max_abs_output_diff"] < 1e-5 and result["max_abs_grad_diff"] < 1e-4

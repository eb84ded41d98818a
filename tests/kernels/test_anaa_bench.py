"""`ehrfm bench anaa` runner: one small configuration end to end (subprocesses), result structure."""

import pytest


@pytest.mark.slow
def test_bench_runs_small_config():
    from ehrfm.kernels.anaa.bench import run

    res = run(["--sizes", "128", "--heads", "2", "--head-dim", "16", "--repeats", "1"])
    rows = {r["impl"]: r for r in res["results"]}
    assert set(rows) == {"reference", "factorized"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["time_s"] > 0 and r["peak_mb"] >= 0
    assert set(res["ratios"][128]) == {"speedup_factorized_vs_reference", "memory_ratio_reference_over_factorized"}

"""kernels/dense/bench.py: the JSON it returns for `ehrfm bench dense`."""

import pytest
import torch

from ehrfm.kernels.dense.bench import run


def test_bench_eager_rows_and_triton_status():
    out = run(["--sizes", "24x8,8x24", "--impls", "eager,triton", "--repeats", "2", "--warmup", "0", "--device", "cpu"])
    assert out["device"] == "cpu" and out["triton_status"].startswith("not measured")
    assert [(r["N"], r["d"], r["gram"]) for r in out["rows"]] == [(24, 8, "d x d"), (8, 24, "N x N")]
    for row in out["rows"]:
        assert row["eager"]["ms"] > 0 and "skipped" in row["triton"]


@pytest.mark.slow
def test_bench_compile_cell():
    out = run(["--sizes", "64x32", "--impls", "eager,compile", "--repeats", "1", "--device", "cpu"])
    cell = out["rows"][0]["compile"]
    assert "ms" in cell, cell
    assert cell["speedup_vs_eager"] > 0
    torch._dynamo.reset()

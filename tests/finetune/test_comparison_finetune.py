"""001's comparison rows finetune and evaluate: LSTM (per-task, from random init), CEHR-BERT and BigBird
(per-task), MultiBird (BigBird with MPF)."""

import json

import pytest

from ehrfm.cli import main

SMALL = dict(hidden_size=32, num_hidden_layers=2, small=False)
ATTENTION = dict(num_attention_heads=4, intermediate_size=64)


@pytest.mark.parametrize(
    "arch,method,extra",
    [("bilstm", "per-task", ["init=random"]), ("cehrbert", "per-task", []), ("bigbird", "mpf", [])],
)
def test_comparison_rows_finetune_and_evaluate(arch, method, extra, ft_data, export_factory, tmp_path):
    overrides = SMALL if arch == "bilstm" else {**SMALL, **ATTENTION}
    export = export_factory(tmp_path / arch, ft_data, arch, **overrides)
    ft = tmp_path / "ft"
    args = ["finetune", "--model", str(export), "--data", str(ft_data), "--out", str(ft), "--method", method]
    assert main([*args, "--epochs", "1", "--context-length", "24", *extra]) == 0
    meta = json.loads((ft / "finetune.json").read_text())
    assert meta["method"] == method and meta["pooling"] == ("ends" if arch == "bilstm" else "first")
    ev = tmp_path / "ev"
    assert main(["evaluate", "--model", str(ft), "--data", str(ft_data), "--out", str(ev), "--bootstrap", "5"]) == 0
    assert any(ev.iterdir())

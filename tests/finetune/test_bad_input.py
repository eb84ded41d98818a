"""Bad input is refused with an error naming the file / field, before any model is loaded or trained."""

import json
import shutil

import polars as pl
import pytest

import ehrfm.finetune.train as train_mod
from ehrfm.cli import main
from ehrfm.finetune.config import FinetuneConfig
from ehrfm.finetune.data import FinetuneInputError


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if finetuning gets as far as loading the backbone."""

    def boom(*_a, **_k):
        raise AssertionError("the backbone was loaded although the input is invalid")

    monkeypatch.setattr(train_mod, "load_backbone", boom)


def _run(model, data, out, **kw):
    cfg = FinetuneConfig(context_length=32, epochs=1, **kw)
    return train_mod.finetune(model, data, out, cfg)


def test_folder_without_ehrfm_export_metadata(ft_data, export_factory, tmp_path, no_loading):
    folder = export_factory(tmp_path / "plain_hf", ft_data, write_metadata=False)
    with pytest.raises(FinetuneInputError, match="ehrfm_export.json"):
        _run(folder, ft_data, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_missing_model_folder(ft_data, tmp_path, no_loading):
    with pytest.raises(FinetuneInputError, match="does not exist"):
        _run(tmp_path / "nope", ft_data, tmp_path / "ft")


def test_vocabulary_mismatch(ft_data, export_factory, tmp_path, no_loading):
    folder = export_factory(tmp_path / "other_vocab", ft_data, vocab_fingerprint="0123456789abcdef")
    with pytest.raises(FinetuneInputError, match=r"vocabulary mismatch.*0123456789abcdef.*manifest.json"):
        _run(folder, ft_data, tmp_path / "ft")


def test_unknown_task(ft_data, llama_export, tmp_path, no_loading):
    with pytest.raises(FinetuneInputError, match=r"unknown task\(s\) \['mortality_30d'\].*any_visit_90d"):
        _run(llama_export, ft_data, tmp_path / "ft", tasks=["mortality_30d"])


def test_task_with_zero_positives(ft_data, llama_export, tmp_path, no_loading, caplog):
    data = tmp_path / "data"
    shutil.copytree(ft_data, data)
    path = data / "labels" / "emer_365d" / "finetune_val.parquet"
    pl.read_parquet(path).with_columns(boolean_value=pl.lit(False)).write_parquet(path)
    # named explicitly: refused, naming the task, split and file
    with pytest.raises(
        FinetuneInputError,
        match=r"task 'emer_365d': zero positive labels in split 'finetune_val'.*finetune_val.parquet",
    ) as err:
        _run(llama_export, data, tmp_path / "ft", tasks=["emer_365d", "any_visit_90d"])
    assert err.value.task == "emer_365d"  # the task at fault, for callers that drop it (ehrfm ablate)
    # the default list (every task of the data): the task is dropped with a warning naming it, the rest trains
    with (
        caplog.at_level("WARNING", logger="ehrfm.finetune"),
        pytest.raises(AssertionError, match="backbone was loaded"),
    ):
        _run(llama_export, data, tmp_path / "ft")
    assert "emer_365d" in caplog.text and "dropped" in caplog.text
    assert train_mod.trainable_tasks(data, ["emer_365d", "any_visit_90d"])[0] == ["any_visit_90d"]
    # no task left: refused
    path = data / "labels" / "any_visit_90d" / "finetune.parquet"
    pl.read_parquet(path).with_columns(boolean_value=pl.lit(True)).write_parquet(path)
    with pytest.raises(FinetuneInputError, match="no task has both classes"):
        _run(llama_export, data, tmp_path / "ft")


def test_bad_config_values_are_named(ft_data, llama_export, tmp_path, no_loading):
    from ehrfm.config import ConfigError

    with pytest.raises(ConfigError, match="train_fraction"):
        _run(llama_export, ft_data, tmp_path / "ft", train_fraction=0.0)
    with pytest.raises(ConfigError, match="pos_weight"):
        _run(llama_export, ft_data, tmp_path / "ft", pos_weight="lots")


def test_cli_reports_errors_and_refuses_anaa_on_mamba(ft_data, export_factory, tmp_path, capsys, no_loading):
    mamba = export_factory(tmp_path / "mamba", ft_data, "mamba")
    code = main(
        [
            "finetune",
            "--model",
            str(mamba),
            "--data",
            str(ft_data),
            "--out",
            str(tmp_path / "ft"),
            "--anaa",
            "--epochs",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--anaa" in err and "mamba" in err.lower() and "no attention" in err
    meta = json.loads((mamba / "ehrfm_export.json").read_text())
    assert meta["architecture"] == "mamba"
    (tmp_path / "not_a_model").mkdir()
    code = main(
        ["finetune", "--model", str(tmp_path / "not_a_model"), "--data", str(ft_data), "--out", str(tmp_path / "ft")]
    )
    assert code == 2 and "ehrfm_export.json" in capsys.readouterr().err

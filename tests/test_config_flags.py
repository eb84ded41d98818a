"""Every command's flags come from its typed config (``ehrfm.config_flags``): a config field is a flag and a
``key=value`` override with no other edit, and every command resolves defaults < --config < flags < key=value."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ehrfm.cli import build_parser
from ehrfm.config import load_config
from ehrfm.config_flags import add_config_arguments, comma_ints, comma_list, config_overrides, flag_name, leaf_fields


def _subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _commands():
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.finetune.config import FinetuneConfig, ForecastConfig
    from ehrfm.launch.slurm import SlurmJob
    from ehrfm.pretrain.config import PretrainConfig

    base = {
        "prepare": ["--input", "I", "--out", "O"],
        "pretrain": ["--data", "D", "--out", "R"],
        "finetune": ["--model", "M", "--data", "D", "--out", "F"],
        "launch slurm": ["--dry-run"],
        "forecast": ["--model", "M", "--data", "D", "--out", "Z"],
    }
    # (command, config class, keys whose flag the command writes by hand, one field to set, its flag value, parsed)
    return [
        ("prepare", PrepareConfig, {"format": None}, base["prepare"], "vocab.num_bins", "7", 7),
        ("pretrain", PretrainConfig, {"out": "--out"}, base["pretrain"], "train.max_steps", "11", 11),
        ("finetune", FinetuneConfig, {}, base["finetune"], "alfia.layer_heads", "2", 2),
        ("forecast", ForecastConfig, {}, base["forecast"], "sampling.samples", "3", 3),
        (
            "launch slurm",
            SlurmJob,
            {"pretrain_args": None, "extra_sbatch": "--sbatch"},
            base["launch slurm"],
            "cpus_per_task",
            "3",
            3,
        ),
    ]


@pytest.mark.parametrize("command,cls,by_hand,base,key,text,value", _commands(), ids=lambda c: str(c)[:20])
def test_every_config_field_is_a_flag_and_flags_lose_to_overrides(command, cls, by_hand, base, key, text, value):
    parser = _subparser(*command.split())
    options = parser._option_string_actions
    for leaf, tp, _, _ in leaf_fields(cls):
        if leaf in by_hand or tp is dict or str(tp).startswith("dict"):
            continue
        assert flag_name(leaf) in options, f"{command}: no flag for config key {leaf}"
    args = parser.parse_args([*base, flag_name(key), text])
    assert _get(load_config(cls, None, config_overrides(args)), key) == value
    args = parser.parse_args(
        [*base, flag_name(key), text, f"{key}=5"] if command != "launch slurm" else [*base, flag_name(key), text]
    )
    if command != "launch slurm":  # launch's positional is the pretraining command, not overrides
        assert _get(load_config(cls, None, config_overrides(args)), key) == 5


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@dataclasses.dataclass
class Extra:
    knob: int = 3
    enabled: bool = True


def _grown():
    from ehrfm.finetune.config import FinetuneConfig

    @dataclasses.dataclass
    class Grown(FinetuneConfig):
        extra: Extra = dataclasses.field(default_factory=Extra)

    return Grown


def test_a_new_field_needs_no_other_edit(tmp_path):
    """A field added to a config (here a subclass with one more nested section and switch) is a flag, a --no-
    switch and an override at once; values go through the config's types (an error names the key)."""
    from ehrfm.config import ConfigError

    Grown = _grown()  # noqa: N806
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*")
    add_config_arguments(parser, Grown)
    cfg = load_config(Grown, None, config_overrides(parser.parse_args(["--extra.knob", "9", "--no-extra.enabled"])))
    assert (cfg.extra.knob, cfg.extra.enabled) == (9, False)
    (tmp_path / "c.yaml").write_text("extra:\n  knob: 4\nepochs: 2\n")
    cfg = load_config(Grown, tmp_path / "c.yaml", config_overrides(parser.parse_args(["extra.knob=6"])))
    assert (cfg.extra.knob, cfg.epochs) == (6, 2)
    with pytest.raises(ConfigError, match="extra.knob"):
        load_config(Grown, None, config_overrides(parser.parse_args(["--extra.knob", "x"])))


def test_old_finetune_spellings_still_work():
    from ehrfm.finetune.cli import build_config

    args = _subparser("finetune").parse_args(
        [
            "--model",
            "M",
            "--data",
            "D",
            "--out",
            "F",
            "--lr",
            "3e-4",
            "--lora",
            "--lora-save",
            "adapter",
            "--anaa",
            "--anaa-mode",
            "rna",
            "--tasks",
            "a,b",
        ]
    )
    cfg = build_config(args)
    assert (cfg.learning_rate, cfg.lora.enabled, cfg.lora.save, cfg.anaa.enabled, cfg.anaa.mode, cfg.tasks) == (
        3e-4,
        True,
        "adapter",
        True,
        "rna",
        ["a", "b"],
    )


def test_comma_list_strips_drops_blanks_and_converts():
    assert comma_list(" a, b,,c ,") == ["a", "b", "c"]
    assert comma_list(None) == [] and comma_list("") == [] and comma_list(" , ") == []
    assert comma_list("1, 10,100", int) == [1, 10, 100]
    assert comma_list("0.25,1", float) == [0.25, 1.0]
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    parser.add_argument("--scales", type=comma_ints)
    assert parser.parse_args(["--scales", "1,2"]).scales == [1, 2]
    with pytest.raises(argparse.ArgumentError, match="invalid comma_ints value"):
        parser.parse_args(["--scales", "1,x"])

"""The package foundation: one namespace over the design-card folders, the CLI, typed configs, seeding."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from ehrfm.config import ConfigError, load_config, parse_overrides, save_config
from ehrfm.data_shards.config import PrepareConfig
from ehrfm.seeding import derive_seed, seed_everything

REPO = Path(__file__).resolve().parents[1]


def test_stage_folders_map_into_one_namespace():
    for stage in ("data_shards", "pretrain", "finetune", "kernels", "launch"):
        module = importlib.import_module(f"ehrfm.{stage}")
        assert Path(module.__file__).resolve().parent == REPO / stage


def test_no_top_level_kernels_package_is_installed():
    dist = importlib.metadata.distribution("ehrfm")
    top_level = {Path(f).parts[0] for f in (dist.files or [])}
    assert "kernels" not in top_level
    # from outside the checkout, `kernels` must not resolve to our folder (transformers probes that name)
    code = "import importlib.util, transformers.utils as u; s = importlib.util.find_spec('kernels'); " \
           "print(s.origin if s else None, u.is_kernels_available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    assert out.split() == ["None", "False"]


def test_cli_lists_subcommands():
    exe = Path(sys.executable).with_name("ehrfm")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("prepare", "models", "demo", "bench"):
        assert command in out


@dataclasses.dataclass
class _Inner:
    rate: float = 0.5
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])


@dataclasses.dataclass
class _Outer:
    steps: int = 10
    flag: bool = False
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  rate: 0.25\n")
    cfg = load_config(_Outer, path, ["flag=true", "inner.names=x,y", "steps=30"])
    assert cfg == _Outer(steps=30, flag=True, inner=_Inner(rate=0.25, names=["x", "y"]))
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(_Outer, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override,match", [
    (["inner.nope=1"], "inner.nope"),
    (["steps=1.5"], "steps: expected an integer"),
    (["flag=maybe"], "flag: expected true/false"),
    (["steps"], "key=value"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_Outer, None, override)


def test_prepare_config_literal_is_checked():
    with pytest.raises(ConfigError, match="history.lookback"):
        load_config(PrepareConfig, None, ["history.lookback=5y"])
    assert parse_overrides(["a.b=1", "c=2"]) == {"a": {"b": "1"}, "c": "2"}


def test_seeding_is_reproducible():
    import torch

    seed_everything(3)
    a = torch.rand(4)
    seed_everything(3)
    assert torch.equal(a, torch.rand(4))
    assert derive_seed(1, "x", 2) == derive_seed(1, "x", 2) != derive_seed(1, "x", 3)

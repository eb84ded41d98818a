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


def _run_python(code: str, cwd: Path | str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=True).stdout


# Where the top-level name `kernels` resolves, and whether transformers takes it for HF's hub-kernel package.
_WHERE_KERNELS_RESOLVES = (
    "import importlib.util, transformers.utils as u; s = importlib.util.find_spec('kernels'); "
    "import transformers.activations; "  # imports HF's `kernels` when transformers finds it (>= 5.25 requires it)
    "import sys; m = sys.modules.get('kernels'); "
    "print(getattr(m, '__file__', None), u.is_kernels_available())"
)


def test_the_checkout_ehrfm_folder_is_the_whole_package():
    """ehrfm/<stage> links the stage folders, so Python, mypy and IDEs started in the checkout see every
    subpackage; in Python started there, the `kernels` folder steps aside for HF's package of that name."""
    for stage in ("data_shards", "pretrain", "finetune", "kernels", "launch"):
        link = REPO / "ehrfm" / stage
        assert link.is_symlink() and link.resolve() == REPO / stage, link
    out = _run_python("import ehrfm.pretrain.train as t; print(t.__file__)", cwd=REPO)
    assert Path(out.strip()).resolve() == REPO / "pretrain" / "train.py"
    # transformers imports `kernels` the same way from the checkout root as from anywhere else
    assert _run_python(_WHERE_KERNELS_RESOLVES, cwd=REPO) == _run_python(_WHERE_KERNELS_RESOLVES, cwd="/")


def test_no_top_level_kernels_package_is_installed():
    dist = importlib.metadata.distribution("ehrfm")
    top_level = {Path(f).parts[0] for f in (dist.files or [])}
    assert "kernels" not in top_level
    # `kernels`, if it resolves at all, is HF's distribution of that name, never our folder
    file, available = _run_python(_WHERE_KERNELS_RESOLVES, cwd=REPO).split()
    if file == "None":
        assert available == "False"
    else:
        hf = importlib.metadata.distribution("kernels")
        assert Path(file).resolve() == Path(hf.locate_file("kernels/__init__.py")).resolve()
        assert Path(file).resolve() != REPO / "kernels" / "__init__.py"


def test_the_kernels_folder_alone_is_no_top_level_package():
    """With only the checkout root on the path, `import kernels` fails with a clear message."""
    code = (
        f"import sys; sys.path = [{str(REPO)!r}]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('refused:', e)\n"
        "else:\n    print('imported', kernels.__file__)"
    )
    out = _run_python(code, cwd="/")
    assert out.startswith("refused:") and "is ehrfm.kernels, not a top-level package" in out, out
    assert "kernels" not in out.split("refused:")[0]


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


@pytest.mark.parametrize(
    "override,match",
    [
        (["inner.nope=1"], "inner.nope"),
        (["steps=1.5"], "steps: expected an integer"),
        (["flag=maybe"], "flag: expected true/false"),
        (["steps"], "key=value"),
    ],
)
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


def test_import_ehrfm_is_light_and_registration_is_explicit(tmp_path):
    """`import ehrfm` pulls in neither torch nor transformers and installs no import hook; after
    `register_auto_classes()` (or importing ehrfm.pretrain.models) the Auto classes know the four backbones."""
    code = (
        "import sys, ehrfm\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
        "assert not [f for f in sys.meta_path if type(f).__module__.startswith('ehrfm')]\n"
        "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM\n"
        "try:\n"
        "    AutoConfig.for_model('ehr_mamba')\n"
        "    print('registered-implicitly')\n"
        "except ValueError:\n"
        "    print('unregistered')\n"
        "from ehrfm.pretrain.models import register_auto_classes\n"
        "register_auto_classes()\n"  # idempotent: the import registered already
        "for t in ('ehr_llama', 'ehr_mamba', 'ehr_mamba2', 'ehr_bert'):\n"
        "    cfg = AutoConfig.for_model(t, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,\n"
        "                               intermediate_size=32, vocab_size=50)\n"
        "    head = AutoModelForMaskedLM if t == 'ehr_bert' else AutoModelForCausalLM\n"
        "    print(type(AutoModel.from_config(cfg)).__name__, type(head.from_config(cfg)).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [
        "unregistered",
        "EhrLlamaModel",
        "EhrLlamaForCausalLM",
        "EhrMambaModel",
        "EhrMambaForCausalLM",
        "EhrMamba2Model",
        "EhrMamba2ForCausalLM",
        "EhrBertModel",
        "EhrBertForMaskedLM",
    ]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    """One helper for every atomic file write: the old content survives a failed write, no temp file is left,
    a finished write replaces the file."""
    from ehrfm.outputs import atomic_file, write_text_atomic

    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    write_text_atomic(target, "new", fsync=True)
    with atomic_file(tmp_path / "m.xgb.json", suffix=".json") as tmp:
        assert tmp.name.endswith(".json") and tmp.parent == tmp_path
        tmp.write_text("{}")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "m.xgb.json"]

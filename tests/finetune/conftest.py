"""Finetuning fixtures: a prepared 6-patient Synthea corpus whose finetune / finetune_val / test splits all
hold both classes of two frequent tasks, and ``make_export`` which fabricates an exported model folder
(the contract of `ehrfm export`) from a randomly initialised backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.prepare import prepare
from ehrfm.data_shards.synthea import generate_cohort

TASKS_YAML = Path(__file__).with_name("tasks_synthea.yaml")
TASKS = ["any_visit_90d", "emer_365d"]
# small backbones keep the suite fast on one core
SMALL = {
    "llama": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4
    ),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "mamba": dict(hidden_size=32, num_hidden_layers=2),
    "mamba2": dict(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=32, state_size=16, chunk_size=16),
    "xlnet": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "modernbert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def make_export(
    folder: Path,
    data_dir: Path,
    arch: str = "llama",
    size: str = "tiny",
    *,
    vocab_fingerprint: str | None = None,
    write_metadata: bool = True,
    seed: int = 0,
    **overrides,
) -> Path:
    """An `ehrfm export`-shaped folder: config.json + model.safetensors of the pretraining head model, the data's
    tokenizer files flat, and ehrfm_export.json (fingerprint from the data unless given)."""
    import torch

    from ehrfm.pretrain.models import build_model  # registers the Auto classes

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    torch.manual_seed(seed)
    kwargs = {**SMALL.get(arch, {}), **overrides} if size == "tiny" and overrides.get("small", True) else overrides
    kwargs.pop("small", None)
    model = build_model(arch, size, head=True, vocab_size=manifest["vocab_size"], **kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    for f in (Path(data_dir) / "tokenizer").iterdir():
        shutil.copy2(f, folder / f.name)
    if write_metadata:
        meta = {
            "architecture": arch,
            "size": size,
            "vocab_fingerprint": vocab_fingerprint or manifest["vocab_fingerprint"],
            "data_fingerprint": manifest["source"]["fingerprint"],
            "step": 0,
            "strategy": "fabricated (random init)",
            "final_metrics": {},
            "config": {},
        }
        (folder / "ehrfm_export.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="session")
def ft_data(tmp_path_factory) -> Path:
    src = generate_cohort(6, seed=11, age="55-90", threads=1)
    out = tmp_path_factory.mktemp("ftdata") / "synthea"
    cfg = PrepareConfig(format="fhir", tasks=[str(TASKS_YAML)])
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test, cfg.splits.val_fraction, cfg.splits.seed = (
        0.2,
        0.5,
        0.3,
        0.4,
        1,
    )
    prepare(src, out, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def llama_export(ft_data, tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export") / "llama", ft_data, "llama")


@pytest.fixture(scope="session")
def export_factory():
    """``make_export`` as a fixture (test modules are not importable as a package under --import-mode=importlib)."""
    return make_export


@pytest.fixture(scope="session")
def tasks() -> list[str]:
    return list(TASKS)

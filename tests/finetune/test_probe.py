"""`ehrfm probe` (004's representation metrics) on a fabricated export of a tiny Llama."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ehrfm.data_shards.collate import assemble_rows
from ehrfm.data_shards.config import PrepareConfig
from ehrfm.data_shards.errors import DataError
from ehrfm.data_shards.prepare import prepare
from ehrfm.data_shards.shards import read_manifest
from ehrfm.data_shards.stream import ShardReader
from ehrfm.data_shards.synthea import generate_cohort
from ehrfm.finetune.probe import probe
from ehrfm.kernels import effective_rank
from ehrfm.pretrain.models import build_model


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    cfg = PrepareConfig(format="fhir", tasks=["demo"])
    cfg.splits.pretrain, cfg.splits.finetune, cfg.splits.test = 0.0, 0.5, 0.5
    prepare(generate_cohort(6, seed=11, age="55-90", threads=1), root / "data", cfg, progress=False)
    manifest = read_manifest(root / "data")
    torch.manual_seed(0)
    model = build_model(
        "llama",
        "tiny",
        vocab_size=manifest["vocab_size"],
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    export = root / "export"
    model.save_pretrained(export)
    for f in (root / "data" / "tokenizer").iterdir():
        shutil.copy(f, export / f.name)
    (export / "ehrfm_export.json").write_text(
        json.dumps({"architecture": "llama", "size": "tiny", "vocab_fingerprint": manifest["vocab_fingerprint"]})
    )
    return root / "data", export, model.model.eval()


def test_metrics_match_an_independent_embedding_path(probe_setup):
    data, export, base = probe_setup
    result = probe(export, data, split="test", k=4, context_length=64)
    manifest = read_manifest(data)
    reader = ShardReader(data, manifest["shards"]["test"])
    docs = []
    for i in range(len(reader)):
        s = reader.get(i)
        docs.append({k: v[-64:] for k, v in s.items() if isinstance(v, np.ndarray) and v.ndim == 1})
    batch = assemble_rows([[d] for d in docs], 64)
    batch.pop("labels")
    with torch.no_grad():
        z = base.get_patient_embedding(batch, pooling="last")[:, 0]  # (B, 1 document, H)
    assert result["patients"] == len(docs)
    assert result["effective_rank"] == pytest.approx(float(effective_rank(z.float())), rel=1e-4)
    # visit-level metrics: every [REG] state of the same (independently assembled) batch
    from ehrfm.data_shards.schema import TokenType
    from ehrfm.kernels import condition_number

    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    regs = hidden[batch["type_ids"] == TokenType.REG].float()
    assert result["visit_states"] == regs.shape[0] > 0
    assert result["effective_rank_visits"] == pytest.approx(float(effective_rank(regs)), rel=1e-4)
    assert result["condition_number_visits"] == pytest.approx(float(condition_number(regs)), rel=1e-3)
    assert 0.0 <= result["adjacent_visit_subspace_distance"] <= 1.0
    for auroc in result["linear_probe_auroc"].values():
        assert auroc is None or 0.0 <= auroc <= 1.0


def test_vocabulary_mismatch_is_refused(probe_setup, tmp_path):
    data, export, _ = probe_setup
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    meta = json.loads((bad / "ehrfm_export.json").read_text())
    meta["vocab_fingerprint"] = "0" * 16
    (bad / "ehrfm_export.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="vocabulary .* differs"):
        probe(bad, data)


def test_cli_writes_probe_json(probe_setup, tmp_path):
    data, export, _ = probe_setup
    exe = Path(sys.executable).with_name("ehrfm")
    out = subprocess.run(
        [
            str(exe),
            "probe",
            "--model",
            str(export),
            "--data",
            str(data),
            "--k",
            "4",
            "--context-length",
            "64",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "effective rank" in out.stdout
    assert json.loads((tmp_path / "probe.json").read_text())["k"] == 4

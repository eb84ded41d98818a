"""Export round trip for the other backbones (single process; llama and mamba under every distributed
strategy are in test_distributed.py): the HF folder layout, Auto* loading after `import ehrfm`, and
trust_remote_code loading in a process that cannot import ehrfm, all equal to the trained model (1e-6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HEAD_AUTO = {
    "llama": "AutoModelForCausalLM",
    "mamba": "AutoModelForCausalLM",
    "mamba2": "AutoModelForCausalLM",
    "bert": "AutoModelForMaskedLM",
    "xlnet": "AutoModelForCausalLM",  # HF files XLNet's LM head there
    "modernbert": "AutoModelForMaskedLM",
}
BASE_CLS = {"llama": "EhrLlamaModel", "mamba": "EhrMambaModel", "mamba2": "EhrMamba2Model", "bert": "EhrBertModel"}
BASE_CLS.update(xlnet="EhrXLNetModel", modernbert="EhrModernBertModel")


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("mamba2", ["dense.enabled=true", "dense.k=4", "dense.lam=0.1"]),  # + the auxiliary-loss extension point
        ("bert", []),
        ("xlnet", []),  # permutation LM
        ("modernbert", []),
        pytest.param("mamba", [], marks=pytest.mark.slow),  # default run: mamba export in test_distributed
    ],
)
def test_export_round_trip(arch, extra, pt_data, tmp_path, run_pretrain, remote_check):
    import transformers

    from ehrfm.data_shards.shards import read_manifest
    from ehrfm.metrics_log import read_metrics
    from ehrfm.pretrain.export import export
    from ehrfm.pretrain.models import is_causal, register_auto_classes

    register_auto_classes()
    causal = is_causal(arch)

    run, hf = tmp_path / "run", tmp_path / "hf"
    run_pretrain(pt_data, run, arch, "train.max_steps=3", "train.val_every=3", "checkpoint.every=0", *extra)
    records = read_metrics(run)
    train = [r for r in records if r.get("split") != "val"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert {
        "loss",
        "lr",
        "grad_norm",
        "real_tokens",
        "padded_tokens",
        "tokens_per_s",
        "step_time_s",
        "peak_memory_mb",
    } <= set(train[0])
    assert 0 < train[0]["real_tokens"] <= train[0]["padded_tokens"]
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    val = [r for r in records if r.get("split") == "val"]
    assert val and val[-1]["val_ppl"] == pytest.approx(torch.tensor(val[-1]["val_loss"]).exp().item(), rel=1e-6)
    # the count-model references of the data folder's manifest sit beside every validation perplexity
    # (MLM: the unigram over code targets, the tokens BERT masks; no bigram reference)
    reference = read_manifest(pt_data)["reference_perplexity"]["all" if causal else "codes"]
    assert val[-1]["ref_unigram_ppl"] == pytest.approx(reference["unigram"])
    assert val[-1].get("ref_bigram_ppl") == (pytest.approx(reference["bigram"]) if causal else None)
    if causal:  # and the perplexity on clinical-code targets beside the code-target references
        codes = read_manifest(pt_data)["reference_perplexity"]["codes"]
        assert val[-1]["ref_code_bigram_ppl"] == pytest.approx(codes["bigram"])
        assert 1 < val[-1]["val_code_ppl"] < float("inf") and val[-1]["val_code_ppl"] != val[-1]["val_ppl"]
        from ehrfm.pretrain.curves import perplexity_report  # `ehrfm bench perplexity`: the same numbers

        report = perplexity_report(["--data", str(pt_data), "--run", str(run)])
        assert report["reference_perplexity"]["codes"]["bigram"] == pytest.approx(codes["bigram"])
        assert report["runs"][0]["codes"]["last"] == pytest.approx(val[-1]["val_code_ppl"])
        assert report["runs"][0]["all"]["last"] == pytest.approx(val[-1]["val_ppl"])
        assert (run / "val_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # every run draws its curve
    if extra:  # each dense term logged per step, and part of the loss
        assert {"aux/dense", "dense/spec", "dense/orth", "dense/sub"} <= set(train[0])
        assert train[0]["aux/dense"] > 0

    import contextlib
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    class RefusingUnpickler(pickle.Unpickler):  # stays a class: modules imported lazily may subclass it
        def load(self):
            refuse()

    with contextlib.ExitStack() as stack:  # export and loading read JSON + safetensors only
        m = stack.enter_context(pytest.MonkeyPatch.context())
        for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            m.setattr(module, name, refuse)
        m.setattr(pickle, "Unpickler", RefusingUnpickler)
        export(run, hf)
        model = getattr(transformers, HEAD_AUTO[arch]).from_pretrained(str(hf)).eval()
    names = {p.name for p in hf.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "ehrfm_vocab.json",
        "ehrfm_export.json",
        "README.md",
    } <= names
    assert ("generation_config.json" in names) == causal
    meta = json.loads((hf / "ehrfm_export.json").read_text())
    manifest = read_manifest(pt_data)
    assert set(meta) == {
        "architecture",
        "size",
        "vocab_fingerprint",
        "data_fingerprint",
        "step",
        "strategy",
        "final_metrics",
        "reference_perplexity",
        "config",
    }
    card = (hf / "README.md").read_text()
    assert "unigram count model" in card and causal == ("bigram count model" in card)
    assert meta["architecture"] == arch and meta["step"] == 3 and meta["strategy"] == "ddp"
    assert meta["vocab_fingerprint"] == manifest["vocab_fingerprint"]
    assert meta["data_fingerprint"] == manifest["source"]["fingerprint"]
    assert "auto_map" in json.loads((hf / "config.json").read_text())

    probe = load_file(str(run / "probe.safetensors"))
    batch = {k[len("batch.") :]: v for k, v in probe.items() if k.startswith("batch.")}
    with torch.no_grad():
        logits = model(**batch).logits
    assert (logits - probe["logits"]).abs().max() <= 1e-6
    assert type(transformers.AutoModel.from_pretrained(str(hf))).__name__ == BASE_CLS[arch]
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    assert len(tok) == manifest["vocab_size"]

    report = remote_check(hf, run / "probe.safetensors", HEAD_AUTO[arch])
    assert report["diff"] <= 1e-6 and not report["ehrfm_imported"]
    assert report["module"].startswith("transformers_modules.") and report["base"] == BASE_CLS[arch]


def test_export_refuses_missing_checkpoint(tmp_path):
    from ehrfm.pretrain.checkpoint import CheckpointError
    from ehrfm.pretrain.export import export

    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        export(tmp_path, tmp_path / "hf")


def test_vendored_code_has_no_package_imports():
    import re

    from ehrfm.pretrain.export import _ROOT, VENDORED, vendored_source

    for name, source in VENDORED.items():
        text = vendored_source((_ROOT / source).read_text())
        assert not re.search(r"^\s*from \.\.", text, flags=re.M), name
        for module in re.findall(r"^\s*from \.(\w+) import", text, flags=re.M):
            assert f"{module}.py" in VENDORED, (name, module)


def test_study_convergence_runs_each_backbone_and_draws_the_curves(pt_data, tmp_path):
    """`ehrfm study convergence`: one run per backbone, a table whose numbers are the runs' own validation
    records, the PNG, and a re-run that trains nothing again."""
    import subprocess
    import sys

    from ehrfm.pretrain.curves import validation_records

    out = tmp_path / "conv"
    exe = Path(sys.executable).with_name("ehrfm")
    args = [
        str(exe),
        "study",
        "convergence",
        "--data",
        str(pt_data),
        "--out",
        str(out),
        "--models",
        "llama,bert",
        "--size",
        "mini",
        "--steps",
        "4",
        "--context-length",
        "32",
        "--pretrain-option",
        "train.val_every=2",
    ]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = {r["run"]: r for r in json.loads((out / "convergence.json").read_text())["rows"]}
    assert set(rows) == {"llama-mini", "bert-mini"}
    llama = validation_records(out / "runs" / "llama")
    assert [r["step"] for r in llama] == [2, 4] and rows["llama-mini"]["val_ppl"] == pytest.approx(llama[-1]["val_ppl"])
    assert rows["bert-mini"]["ref_bigram_ppl"] is None and rows["llama-mini"]["ref_code_bigram_ppl"] > 0
    assert "| llama-mini | 4 |" in (out / "convergence.md").read_text()
    assert (out / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "runs" / "llama" / "metrics.jsonl").stat().st_mtime_ns
    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and (out / "runs" / "llama" / "metrics.jsonl").stat().st_mtime_ns == before

"""`ehrfm export`: a (sharded) checkpoint -> a self-contained HuggingFace folder.

HFDIR layout (the finetune stage reads exactly this)::

    config.json            HF config of the pretraining head model, with "auto_map" for trust_remote_code
    model.safetensors      consolidated weights (from DCP shards, or DeepSpeed's consolidated file)
    generation_config.json causal backbones only
    tokenizer.json, tokenizer_config.json, [special_tokens_map.json], ehrfm_vocab.json   (flat)
    ehrfm_export.json      {"architecture", "size", "vocab_fingerprint", "data_fingerprint", "step", "strategy",
                            "final_metrics", "config"}
    README.md              model card
    ehrfm_*.py             the modeling code, vendored: loads without ehrfm installed (trust_remote_code=True)

Loading: ``import ehrfm.pretrain.models; AutoModelForCausalLM.from_pretrained(HFDIR)`` (or AutoModelForMaskedLM for BERT and ModernBERT;
AutoModel gives the backbone), or ``AutoModel*.from_pretrained(HFDIR, trust_remote_code=True)`` anywhere.
Weights are read from safetensors only; no pickle is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from ..data_shards.reference_ppl import for_data_dir, reference_for
from ..logging import get_logger
from . import checkpoint as ckpt

log = get_logger(__name__)

_ROOT = Path(__file__).resolve().parent.parent  # the repo folder holding data_shards/, kernels/, pretrain/
# shipped file name -> source file (relative to the repo folder)
VENDORED = {
    "ehrfm_schema.py": "data_shards/schema.py",
    "ehrfm_scan_reference.py": "kernels/mamba_scan/reference.py",
    "ehrfm_scan.py": "kernels/mamba_scan/scan.py",
    "ehrfm_ssd.py": "kernels/mamba_scan/ssd.py",
    "ehrfm_configuration.py": "pretrain/models/configuration.py",
    "ehrfm_masking.py": "pretrain/models/masking.py",
    "ehrfm_hf_cache_compat.py": "pretrain/models/hf_cache_compat.py",
    "ehrfm_embeddings.py": "pretrain/models/embeddings.py",
    "ehrfm_common.py": "pretrain/models/common.py",
    "ehrfm_ssm.py": "pretrain/models/ssm.py",
    "ehrfm_llama.py": "pretrain/models/llama.py",
    "ehrfm_mamba.py": "pretrain/models/mamba.py",
    "ehrfm_mamba2.py": "pretrain/models/mamba2.py",
    "ehrfm_bert.py": "pretrain/models/bert.py",
    "ehrfm_xlnet.py": "pretrain/models/xlnet.py",
    "ehrfm_modernbert.py": "pretrain/models/modernbert.py",
}
VENDORED.update({f"ehrfm_{name}.py": f"pretrain/models/{name}.py" for name in ("bigbird", "cehrbert", "bilstm")})
# import path as written in the sources -> shipped module
_IMPORT_MAP = {
    "...data_shards.schema": "ehrfm_schema",
    "...kernels.mamba_scan.scan": "ehrfm_scan",
    "...kernels.mamba_scan.ssd": "ehrfm_ssd",
    ".reference": "ehrfm_scan_reference",
    ".scan": "ehrfm_scan",
    **{
        f".{name}": f"ehrfm_{name}"
        for name in (
            "configuration",
            "masking",
            "hf_cache_compat",
            "embeddings",
            "common",
            "ssm",
            "llama",
            "mamba",
            "mamba2",
            "bert",
            "xlnet",
            "modernbert",
        )
    },
}
_IMPORT_MAP.update({f".{name}": f"ehrfm_{name}" for name in ("bigbird", "cehrbert", "bilstm")})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "ehrfm_vocab.json")


def vendored_source(source: str) -> str:
    """Source text with its package-relative imports rewritten to the flat shipped modules."""

    def rewrite(match: re.Match) -> str:
        module = match.group(2)
        if module not in _IMPORT_MAP:
            raise ValueError(f"cannot vendor import {match.group(0)!r}: add its module to export.VENDORED")
        return f"{match.group(1)}from .{_IMPORT_MAP[module]} import"

    text = re.sub(r"^(\s*)from (\.+[\w.]*) import", rewrite, source, flags=re.M)
    if re.search(r"^\s*(from|import) ehrfm\b", text, flags=re.M):
        raise ValueError("vendored code must not import ehrfm")
    return text


def write_remote_code(folder: Path, architecture: str) -> dict:
    """Ship the modeling code into ``folder``; returns the config.json ``auto_map``."""
    from .models import ARCHITECTURES, head_auto_class

    for name, source in VENDORED.items():
        (folder / name).write_text(vendored_source((_ROOT / source).read_text()))
    config_cls, base_cls, head_cls = ARCHITECTURES[architecture]
    module = f"ehrfm_{architecture}"
    head_auto = head_auto_class(architecture).__name__
    return {
        "AutoConfig": f"ehrfm_configuration.{config_cls.__name__}",
        "AutoModel": f"{module}.{base_cls.__name__}",
        head_auto: f"{module}.{head_cls.__name__}",
    }


def load_checkpoint_model(path: Path):
    """The pretraining head model of a checkpoint (CPU, fp32, eval mode) and the run config dict."""
    from .models import ARCHITECTURES

    run_cfg = yaml.safe_load((path / "config.yaml").read_text())
    architecture = run_cfg["model"]["architecture"]
    config_cls, _, head_cls = ARCHITECTURES[architecture]
    config = config_cls.from_json_file(str(path / "model_config.json"))
    model = head_cls(config)
    weights = ckpt.load_consolidated_weights(path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ckpt.CheckpointError(
            f"{path}: weights do not fit {head_cls.__name__}: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    return model.eval(), run_cfg


def export(run_dir, out, *, step: int | None = None, best: bool = False, overwrite: bool = False) -> Path:
    """Consolidate checkpoint ``step`` (default latest; ``best`` = the best-validation one) of ``run_dir``
    into the HF folder ``out`` (written to a temp folder, then renamed; an existing ``out`` is replaced only if
    `ehrfm export` wrote it, or with ``overwrite``, and never when it is or holds an input: :mod:`ehrfm.outputs`).
    The checkpoint must pass its integrity check and belong to the data folder it names."""
    from ..data_shards.shards import read_manifest
    from ..outputs import atomic_output, check_output_dir

    run_dir, out = Path(run_dir), Path(out)
    if best:
        pointer = ckpt.checkpoint_root(run_dir) / "best"
        if not pointer.is_file():
            raise ckpt.CheckpointError(f"{run_dir}: no best checkpoint recorded")
        path = ckpt.checkpoint_root(run_dir) / pointer.read_text().strip()
    else:
        path = ckpt.find_checkpoint(run_dir, step)
    check_output_dir(out, "export", inputs=[run_dir], overwrite=overwrite)
    ckpt.verify_checkpoint(path)
    state = ckpt.read_state(path)
    run_cfg = yaml.safe_load((path / "config.yaml").read_text())
    data_dir = Path(run_cfg["data"]["path"])
    manifest = read_manifest(data_dir)
    ckpt.check_data_identity(path, state, ckpt.data_identity(data_dir, manifest))
    with atomic_output(
        out, "export", inputs=[run_dir, data_dir], overwrite=overwrite, fingerprint=manifest.get("vocab_fingerprint")
    ) as tmp:
        _write_export(tmp, path, state, data_dir, manifest)
    log.info("exported %s (step %d) to %s", path, state.step, out)
    return out


def _write_export(tmp: Path, path: Path, state, data_dir: Path, manifest: dict) -> None:
    """The HF folder of checkpoint ``path`` into ``tmp`` (layout in the module docstring)."""
    from .models import is_causal

    model, run_cfg = load_checkpoint_model(path)
    architecture = run_cfg["model"]["architecture"]
    final_metrics = {
        "val_history": state.val_history[-1:],
        "best_val_loss": state.best_score,
        "best_step": state.best_step,
        "tokens_seen": state.tokens_seen,
    }
    meta = {
        "architecture": architecture,
        "size": run_cfg["model"]["size"],
        "vocab_fingerprint": manifest.get("vocab_fingerprint"),
        "data_fingerprint": (manifest.get("source") or {}).get("fingerprint"),
        "step": state.step,
        "strategy": state.strategy,
        "final_metrics": final_metrics,
        "reference_perplexity": reference_for(for_data_dir(data_dir, manifest), causal=is_causal(architecture)),
        "config": run_cfg,
    }
    _write_hf_folder(tmp, model, meta, data_dir)


def _write_hf_folder(tmp: Path, model, meta: dict, data_dir: Path) -> None:
    """Weights + config (with ``auto_map``), vendored code, tokenizer files, ``ehrfm_export.json`` and card."""
    model.config.auto_map = write_remote_code(tmp, meta["architecture"])
    model.save_pretrained(str(tmp))  # config.json (+ auto_map), model.safetensors, generation_config.json
    for name in TOKENIZER_FILES:
        if (data_dir / "tokenizer" / name).is_file():
            shutil.copy2(data_dir / "tokenizer" / name, tmp / name)
    (tmp / "ehrfm_export.json").write_text(json.dumps(meta, indent=2, default=str))
    (tmp / "README.md").write_text(model_card(meta, model))


def export_untrained(
    architecture: str, size: str, data_dir, out, *, seed: int = 0, overrides: dict | None = None
) -> Path:
    """An export of a freshly initialised (seeded) ``architecture``/``size`` model sized to ``data_dir``'s
    vocabulary, never pretrained: the starting point of a model its paper trains from scratch per task (001's
    LSTM), finetuned like any export. Its ``ehrfm_export.json`` says ``"step": 0`` and ``"pretrained": false``."""
    import torch

    from ..data_shards.shards import read_manifest
    from ..outputs import atomic_output, check_output_dir
    from .models import build_model

    data_dir, out = Path(data_dir), Path(out)
    manifest = read_manifest(data_dir)
    check_output_dir(out, "export", inputs=[data_dir])
    torch.manual_seed(seed)
    model = build_model(architecture, size, vocab_size=manifest["vocab_size"], **(overrides or {})).eval()
    meta = {
        "architecture": architecture,
        "size": size,
        "vocab_fingerprint": manifest.get("vocab_fingerprint"),
        "data_fingerprint": (manifest.get("source") or {}).get("fingerprint"),
        "step": 0,
        "strategy": None,
        "pretrained": False,
        "final_metrics": {"val_history": [], "best_val_loss": None, "best_step": None, "tokens_seen": 0},
        "reference_perplexity": {},
        "config": {"model": {"architecture": architecture, "size": size, "overrides": overrides or {}}, "seed": seed},
    }
    with atomic_output(out, "export", inputs=[data_dir], fingerprint=manifest.get("vocab_fingerprint")) as tmp:
        _write_hf_folder(tmp, model, meta, data_dir)
    log.info("wrote an untrained %s-%s export to %s", architecture, size, out)
    return out


def _reference_rows(reference: dict) -> str:
    """Model-card rows of the count-model references (``data_shards.reference_ppl``), same validation split."""
    names = {
        "ref_unigram_ppl": "unigram count model",
        "ref_bigram_ppl": "bigram count model",
        "ref_code_unigram_ppl": "unigram count model, clinical-code targets",
        "ref_code_bigram_ppl": "bigram count model, clinical-code targets",
    }
    rows = [f"| reference perplexity, {names[k]} (add-k, pretrain_val) | {v:.3f} |" for k, v in reference.items()]
    return "\n".join(rows) if rows else "| reference perplexities | n/a |"


def model_card(meta: dict, model) -> str:
    params = sum(p.numel() for p in model.parameters())
    from .models import OBJECTIVE_WORDS, OBJECTIVES, head_auto_class

    head = head_auto_class(meta["architecture"]).__name__
    objective = OBJECTIVE_WORDS[OBJECTIVES[meta["architecture"]]]
    last = (meta["final_metrics"]["val_history"] or [{}])[-1]
    intro = (
        f"EHR foundation model pretrained with `ehrfm pretrain` ({objective} prediction)."
        if meta.get("pretrained", True)
        else "EHR model with freshly initialised weights, not pretrained (`export_untrained`): finetune it from scratch."
    )
    return f"""---
library_name: transformers
tags: [ehr, ehrfm, {meta["architecture"]}]
---
# ehrfm {meta["architecture"]} ({meta["size"]})

{intro}

| | |
|---|---|
| parameters | {params / 1e6:.2f} M |
| steps | {meta["step"]} |
| strategy | {meta["strategy"]} |
| validation loss (last) | {last.get("val_loss", "n/a")} |
| validation perplexity (last) | {last.get("val_ppl", "n/a")} |
| validation perplexity on clinical-code targets (last) | {last.get("val_code_ppl", "n/a")} |
| best validation loss | {meta["final_metrics"]["best_val_loss"]} (step {meta["final_metrics"]["best_step"]}) |
{_reference_rows(meta.get("reference_perplexity") or {})}
| data fingerprint | `{meta["data_fingerprint"]}` |
| vocabulary fingerprint | `{meta["vocab_fingerprint"]}` |

## Use

```python
import ehrfm  # registers the ehrfm model types; or pass trust_remote_code=True without ehrfm installed
from transformers import AutoModel, {head}, AutoTokenizer
model = {head}.from_pretrained("PATH")
backbone = AutoModel.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```

Inputs are ehrfm batches (`input_ids, type_ids, ages, times, visit_segments, visit_orders, position_ids,
attention_mask` / `document_ids`). Finetuning refuses data whose vocabulary fingerprint differs.

## Training config

```yaml
{yaml.safe_dump(meta["config"], sort_keys=False).strip()}
```
"""

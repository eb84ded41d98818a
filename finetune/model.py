"""A backbone (exported HF base model, optionally with peft LoRA) plus the heads of one finetuning method,
and the finetuned-model folder format.

Finetuned folder (``ehrfm finetune --out FT``):
    finetune.json        method, tasks, task token ids, pooling, fused layers, export metadata, history
    finetune.yaml        the resolved FinetuneConfig
    heads.safetensors    head weights
    backbone/            save_pretrained of the finetuned base model (full or LoRA-merged), or
    adapter/             the peft LoRA adapter only (``lora.save=adapter``; the base is the export folder)
    tokenizer files      copied from the export folder
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ehrfm.data_shards.shards import write_json_atomic

from .config import FinetuneConfig
from .data import EXPORT_FILE, FinetuneInputError, model_inputs, read_export_metadata
from .heads import AlfiaHead, ClassificationHead
from .regularizers import hf_model
from .survival import SURVIVAL_GRID, SurvivalHead

log = logging.getLogger("ehrfm.finetune")

# LoRA targets (peft regex on module names of the base model): attention + MLP for Llama / BERT / ModernBERT,
# in/out projections for Mamba / Mamba2, the feed-forward for XLNet.
LORA_TARGETS = {
    "ehr_llama": r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    "ehr_bert": r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "ehr_mamba": r".*layers\.\d+\.mixer\.(in_proj|out_proj)",
    "ehr_mamba2": r".*layers\.\d+\.mixer\.(in_proj|out_proj)",
    # XLNet's q/k/v/o/r are raw (H, n, d) parameters that peft cannot wrap: LoRA on its feed-forward only
    "ehr_xlnet": r".*layer\.\d+\.ff\.(layer_1|layer_2)",
    "ehr_modernbert": r".*layers\.\d+\.(attn\.(Wqkv|Wo)|mlp\.(Wi|Wo))",
}
# BigBird / CEHR-BERT: BERT's module names; the Bi-LSTM has none (peft cannot wrap nn.LSTM)
LORA_TARGETS.update(ehr_bigbird=LORA_TARGETS["ehr_bert"], ehr_cehrbert=LORA_TARGETS["ehr_bert"])
# BERT-family text encoders of the clinical-text path (finetune/text.py) share ehr_bert's module names
LORA_TARGETS.update({name: LORA_TARGETS["ehr_bert"] for name in ("bert", "roberta", "xlm-roberta", "electra")})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "ehrfm_vocab.json")


def random_backbone(model_dir: Path, seed: int):
    """The base model of ``model_dir``'s architecture and config with freshly initialised weights (HF's
    ``_init_weights``, seeded): the from-scratch control of ``--init random``."""
    from transformers import AutoConfig, AutoModel

    from ehrfm.pretrain.models import register_auto_classes

    register_auto_classes()
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except Exception as err:  # noqa: BLE001
        raise FinetuneInputError(f"{model_dir}: cannot read the model config ({err})") from None
    torch.manual_seed(seed)
    return AutoModel.from_config(config)


def load_backbone(model_dir: Path):
    """Base model (hidden states) of an exported / finetuned HF folder via ``AutoModel``."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from ehrfm.pretrain.models import register_auto_classes

    register_auto_classes()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the pretraining head's lm_head is "unexpected" for the base model: expected
    try:
        return AutoModel.from_pretrained(str(model_dir))
    except Exception as err:  # noqa: BLE001
        raise FinetuneInputError(f"{model_dir}: cannot load the model with AutoModel ({err})") from None
    finally:
        hf_logging.set_verbosity(previous)


def apply_lora(backbone, cfg: FinetuneConfig):
    """Wrap ``backbone`` with peft LoRA on its attention/MLP (or Mamba in/out) projections; base frozen."""
    from peft import LoraConfig, get_peft_model

    model_type = backbone.config.model_type
    if model_type not in LORA_TARGETS:
        raise FinetuneInputError(f"LoRA: no target modules known for model type {model_type!r}")
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=LORA_TARGETS[model_type],
        bias="none",
    )
    return get_peft_model(backbone, lora)


def layer_modules(backbone) -> nn.ModuleList:
    """The block list of a backbone: ``layers`` (Llama, Mamba, Mamba2, ModernBERT), ``encoder.layer`` (BERT) or
    ``layer`` (XLNet)."""
    model = hf_model(backbone)
    if hasattr(model, "layers"):
        return model.layers
    if isinstance(getattr(model, "layer", None), nn.ModuleList):
        return model.layer
    if hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        return model.encoder.layer
    raise FinetuneInputError(f"{type(model).__name__}: cannot find its layer list for ALFIA")


class FinetuneModel(nn.Module):
    """Backbone + heads. ``forward(batch) -> dict(logits (B,), layer_weights (B, N_f) | None, embedding (B, H))``.

    per-task: one :class:`ClassificationHead` per task on the pooled state (last non-pad token; first token
    for BERT and ModernBERT: the backbone's ``default_pooling``); mpf: one shared head on the task-token state; alfia: one :class:`AlfiaHead` per task on the
    top ``num_fuse`` hidden states (the embedding output counts as layer 0; the top one is the final, normed
    state). Rows are routed to their task's head by ``batch["task"]``.
    """

    def __init__(
        self,
        backbone,
        method: str,
        tasks: list[str],
        cfg: FinetuneConfig,
        num_fuse: int | None = None,
        survival_edges: dict[str, list[float]] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.tasks = list(tasks)
        self.survival_edges = dict(survival_edges or {})
        if self.survival_edges and method != "per-task":
            raise FinetuneInputError(
                f"time-to-event tasks {sorted(self.survival_edges)} need --method per-task (a survival head per task)"
            )
        base = hf_model(backbone)
        hidden = base.config.hidden_size
        self.pooling = getattr(base, "default_pooling", "last")
        if method == "mpf":
            self.heads = nn.ModuleList([ClassificationHead(hidden, cfg.head_hidden, cfg.dropout)])
        elif method == "per-task":
            self.heads = nn.ModuleList(
                [
                    SurvivalHead(hidden, self.survival_edges[t], cfg.survival.head, cfg.dropout)
                    if t in self.survival_edges
                    else ClassificationHead(hidden, cfg.head_hidden, cfg.dropout)
                    for t in tasks
                ]
            )
        elif method == "alfia":
            available = len(layer_modules(backbone)) + 1
            self.num_fuse = num_fuse or min(cfg.alfia.num_fuse_layers, available)
            if self.num_fuse > available:
                raise FinetuneInputError(f"ALFIA: {self.num_fuse} fused layers requested, the backbone has {available}")
            if self.num_fuse < cfg.alfia.num_fuse_layers:
                log.warning(
                    "ALFIA: backbone has %d layers + embeddings; fusing %d instead of %d",
                    available - 1,
                    self.num_fuse,
                    cfg.alfia.num_fuse_layers,
                )
            a = cfg.alfia
            self.heads = nn.ModuleList(
                [
                    AlfiaHead(hidden, self.num_fuse, a.layer_heads, a.gating, a.classifier_heads, a.dropout)
                    for _ in tasks
                ]
            )
        else:
            raise ValueError(f"unknown method {method!r}")
        if method != "alfia":
            self.num_fuse = None

    def _hidden_states(self, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Last hidden state (B, T, H) and, for ALFIA, the top num_fuse states [(B, T, H)] bottom to top."""
        if self.method != "alfia":
            return self.backbone(**inputs).last_hidden_state, None
        layers = layer_modules(self.backbone)
        captured: list[torch.Tensor] = []

        def pre_hook(_m, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        def post_hook(_m, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
        handles += [layer.register_forward_hook(post_hook) for layer in layers]
        try:
            last = self.backbone(**inputs).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        shape = last.shape
        if getattr(hf_model(self.backbone), "seq_first_layers", False):  # XLNet: layers see (T, B, H)
            captured = [c.transpose(0, 1) for c in captured]
        states = [c.reshape(shape) for c in captured[:-1]] + [last]  # top layer: after the final norm
        return last, states[-self.num_fuse :]

    def pool(self, last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, H): last non-pad token, or the first token for BERT-style backbones, or both halves
        ("ends": Bi-LSTM, forward state at the last token and backward state at the first)."""
        if self.pooling == "first":
            return last[:, 0]
        index = (mask.long().sum(1) - 1).clamp(min=0)
        final = last[torch.arange(last.shape[0], device=last.device), index]
        if self.pooling == "ends":
            half = last.shape[-1] // 2
            return torch.cat([final[:, :half], last[:, 0, half:]], dim=-1)
        return final

    def forward(self, batch: dict) -> dict:
        inputs = model_inputs(batch)
        mask = inputs["attention_mask"]
        task = batch["task"]
        last, states = self._hidden_states(inputs)
        if self.method == "alfia":
            stacked = torch.stack(states, dim=1)  # (B, N_f, T, H)
            outs = [head(stacked, mask) for head in self.heads]
            logits = torch.stack([o[0] for o in outs], 1).gather(1, task[:, None])[:, 0]
            idx = task[:, None, None]
            lam = torch.stack([o[1] for o in outs], 1).gather(1, idx.expand(-1, 1, self.num_fuse))[:, 0]
            emb = torch.stack([o[2] for o in outs], 1).gather(1, idx.expand(-1, 1, last.shape[-1]))[:, 0]
            return {"logits": logits, "layer_weights": lam, "embedding": emb}
        pooled = self.pool(last, mask)
        if self.method == "mpf":
            return {"logits": self.heads[0](pooled), "layer_weights": None, "embedding": pooled}
        per_head, survival_out, curves = [], [], []
        for head in self.heads:
            if isinstance(head, SurvivalHead):
                out = head(pooled)
                grid = SURVIVAL_GRID.to(out.device) * head.edges[-1]
                curve = head.survival(out, grid)  # (B, G); its last point is the horizon
                at_horizon = curve[:, -1].clamp(1e-6, 1 - 1e-6)
                per_head.append(torch.log1p(-at_horizon) - torch.log(at_horizon))  # logit of P(event by horizon)
                survival_out.append(out)
                curves.append(curve)
            else:
                per_head.append(head(pooled).float())
                survival_out.append(None)
                curves.append(None)
        logits = torch.stack(per_head, 1).gather(1, task[:, None])[:, 0]
        result = {"logits": logits, "layer_weights": None, "embedding": pooled}
        if self.survival_edges:
            blank = torch.full((len(task), len(SURVIVAL_GRID)), float("nan"), device=pooled.device)
            stacked = torch.stack([c if c is not None else blank for c in curves], 1)
            result["survival"] = stacked.gather(1, task[:, None, None].expand(-1, 1, stacked.shape[-1]))[:, 0]
            result["survival_params"] = survival_out
        return result

    def loss(self, out: dict, batch: dict, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over rows of BCE-with-logits (binary tasks; ``pos_weight`` (T,) per task) and the censored
        survival negative log-likelihood (time-to-event tasks, their head's likelihood)."""
        label, task = batch["label"], batch["task"]
        weight = None
        if pos_weight is not None:
            weight = torch.where(label > 0, pos_weight[task], torch.ones_like(label))
        if not self.survival_edges:
            return F.binary_cross_entropy_with_logits(out["logits"].float(), label, weight=weight)
        binary = torch.ones_like(label, dtype=torch.bool)
        total = out["logits"].new_zeros(())
        for index, head in enumerate(self.heads):
            if isinstance(head, SurvivalHead):
                rows = task == index
                binary &= ~rows
                if rows.any():
                    params = out["survival_params"][index][rows]
                    total = total + head.loss(params, batch["time"][rows], label[rows]) * rows.sum()
        if binary.any():
            bce = F.binary_cross_entropy_with_logits(
                out["logits"][binary].float(),
                label[binary],
                weight=None if weight is None else weight[binary],
                reduction="sum",
            )
            total = total + bce
        return total / len(label)


def save_finetuned(
    model: FinetuneModel,
    out: Path,
    meta: dict,
    cfg: FinetuneConfig,
    export_dir: Path,
    *,
    inputs: list | None = None,
    overwrite: bool = False,
) -> None:
    """Write the finetuned folder (see the module docstring) into ``out`` atomically (temp dir, rename); an
    existing ``out`` is replaced only under the rules of :mod:`ehrfm.outputs`."""
    from ehrfm.outputs import atomic_output

    with atomic_output(
        Path(out),
        "finetune",
        inputs=inputs or [export_dir],
        overwrite=overwrite,
        fingerprint=meta.get("vocab_fingerprint"),
    ) as tmp:
        _write_finetuned(tmp, model, meta, cfg, export_dir)


def _write_finetuned(tmp: Path, model: FinetuneModel, meta: dict, cfg: FinetuneConfig, export_dir: Path) -> None:
    from safetensors.torch import save_file

    from ehrfm.config import save_config

    backbone = model.backbone
    if hasattr(backbone, "get_base_model"):  # peft
        if cfg.lora.save == "adapter":
            backbone.save_pretrained(str(tmp / "adapter"))
            meta["base_model"] = str(Path(export_dir).resolve())
        else:
            backbone = backbone.merge_and_unload()
            model.backbone = backbone
    if not (tmp / "adapter").exists():
        backbone.save_pretrained(str(tmp / "backbone"))
    state = {k: v.detach().contiguous() for k, v in model.heads.state_dict().items()}
    save_file(state, str(tmp / "heads.safetensors"))
    for name in TOKENIZER_FILES:
        if (Path(export_dir) / name).exists():
            shutil.copy2(Path(export_dir) / name, tmp / name)
    shutil.copy2(Path(export_dir) / EXPORT_FILE, tmp / EXPORT_FILE)
    save_config(cfg, tmp / "finetune.yaml")
    write_json_atomic(tmp / "finetune.json", meta)


def read_finetune_metadata(ft_dir: Path) -> dict:
    path = Path(ft_dir) / "finetune.json"
    if not path.exists():
        raise FinetuneInputError(f"{ft_dir}: not a finetuned ehrfm model (no finetune.json); run `ehrfm finetune`")
    return json.loads(path.read_text())


def load_finetuned(ft_dir: Path) -> tuple[FinetuneModel, dict]:
    """A finetuned folder -> (model in eval mode, finetune.json metadata)."""
    from safetensors.torch import load_file

    from ehrfm.config import load_config

    ft_dir = Path(ft_dir)
    meta = read_finetune_metadata(ft_dir)
    cfg = load_config(FinetuneConfig, ft_dir / "finetune.yaml")
    if (ft_dir / "adapter").exists():
        from peft import PeftModel

        base_dir = Path(meta["base_model"])
        read_export_metadata(base_dir)
        backbone = PeftModel.from_pretrained(load_backbone(base_dir), str(ft_dir / "adapter"))
    else:
        backbone = load_backbone(ft_dir / "backbone")
    model = FinetuneModel(
        backbone,
        meta["method"],
        meta["tasks"],
        cfg,
        num_fuse=meta.get("num_fuse"),
        survival_edges=meta.get("survival_edges"),
    )
    model.heads.load_state_dict(load_file(str(ft_dir / "heads.safetensors")), strict=True)
    return model.eval(), meta

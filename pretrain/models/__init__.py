"""EHR foundation-model backbones as HF ``transformers`` classes: Llama, Mamba, Mamba2 (causal NTP), BERT and
ModernBERT (MLM) and XLNet (permutation LM), over the EHR embeddings of 001. Importing this package registers every config/model with the Auto
classes (``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``, ``AutoModelForMaskedLM``), so
``save_pretrained`` folders load back through ``AutoModel*.from_pretrained``.

Batch contract: every model's ``forward`` takes the keys of ``ehrfm.data_shards.schema.BATCH_KEYS`` plus
``labels`` as keyword arguments. None of the models holds any parallelism.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .bert import EhrBertForMaskedLM, EhrBertModel
from .bigbird import EhrBigBirdForMaskedLM, EhrBigBirdModel
from .bilstm import EhrBiLstmForMaskedLM, EhrBiLstmModel
from .cehrbert import EhrCehrBertForMaskedLM, EhrCehrBertModel
from .configuration import (
    CONFIG_CLASSES,
    EhrBertConfig,
    EhrBigBirdConfig,
    EhrBiLstmConfig,
    EhrCehrBertConfig,
    EhrLlamaConfig,
    EhrMamba2Config,
    EhrMambaConfig,
    EhrModernBertConfig,
    EhrXLNetConfig,
)
from .llama import EhrLlamaForCausalLM, EhrLlamaModel
from .mamba import EhrMambaForCausalLM, EhrMambaModel
from .mamba2 import EhrMamba2ForCausalLM, EhrMamba2Model
from .modernbert import EhrModernBertForMaskedLM, EhrModernBertModel
from .xlnet import EhrXLNetLMHeadModel, EhrXLNetModel

# architecture name -> (config, base model, pretraining head model)
ARCHITECTURES = {
    "llama": (EhrLlamaConfig, EhrLlamaModel, EhrLlamaForCausalLM),
    "mamba": (EhrMambaConfig, EhrMambaModel, EhrMambaForCausalLM),
    "mamba2": (EhrMamba2Config, EhrMamba2Model, EhrMamba2ForCausalLM),
    "bert": (EhrBertConfig, EhrBertModel, EhrBertForMaskedLM),
    "xlnet": (EhrXLNetConfig, EhrXLNetModel, EhrXLNetLMHeadModel),
    "modernbert": (EhrModernBertConfig, EhrModernBertModel, EhrModernBertForMaskedLM),
    # 001's comparison set (README "001 comparison set"); MultiBird is bigbird finetuned with MPF
    "bigbird": (EhrBigBirdConfig, EhrBigBirdModel, EhrBigBirdForMaskedLM),
    "cehrbert": (EhrCehrBertConfig, EhrCehrBertModel, EhrCehrBertForMaskedLM),
    "bilstm": (EhrBiLstmConfig, EhrBiLstmModel, EhrBiLstmForMaskedLM),
}

# architecture name -> pretraining objective: "ntp" next-token (causal), "mlm" masked, "plm" permutation (XLNet)
# cehrbert adds visit-type prediction to MLM (an auxiliary loss of pretrain.objectives); bilstm is not
# pretrained in 001 (finetuned from random init) but ehrfm can pretrain it with MLM
OBJECTIVES = {
    "llama": "ntp",
    "mamba": "ntp",
    "mamba2": "ntp",
    "bert": "mlm",
    "xlnet": "plm",
    "modernbert": "mlm",
    "bigbird": "mlm",
    "cehrbert": "mlm",
    "bilstm": "mlm",
}
# objective -> the HF Auto class of its head model (HF files XLNet's permutation head under causal LM too)
HEAD_AUTO = {"ntp": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM, "plm": AutoModelForCausalLM}
# objective -> words for model cards and logs
OBJECTIVE_WORDS = {"ntp": "next-token", "mlm": "masked", "plm": "permutation"}


def is_causal(architecture: str) -> bool:
    """True for next-token (left-to-right) backbones; they alone can sample futures (forecast)."""
    return OBJECTIVES[architecture] == "ntp"


def head_auto_class(architecture: str):
    """The HF Auto class that loads ``architecture``'s pretraining head model."""
    return HEAD_AUTO[OBJECTIVES[architecture]]


def register_auto_classes() -> None:
    """Idempotent registration of every architecture with the HF Auto classes."""
    for name, (config_cls, base_cls, head_cls) in ARCHITECTURES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        head_auto_class(name).register(config_cls, head_cls, exist_ok=True)


def build_model(architecture: str, size: str = "tiny", head: bool = True, **overrides):
    """A freshly initialised model: ``build_model("mamba", "small", vocab_size=8000)``; head=False gives the
    base model (hidden states only)."""
    config_cls, base_cls, head_cls = ARCHITECTURES[architecture]
    config = config_cls.from_preset(size, **overrides)
    return (head_cls if head else base_cls)(config)


def build_meta_model(architecture: str, size: str = "tiny", head: bool = True, **overrides):
    """``build_model`` on the meta device: the config, shapes and parameter counts without allocating or
    initialising any weight (``ehrfm models --params``, ``ehrfm plan``)."""
    import torch

    with torch.device("meta"):
        return build_model(architecture, size, head=head, **overrides)


register_auto_classes()

__all__ = [
    "ARCHITECTURES",
    "CONFIG_CLASSES",
    "HEAD_AUTO",
    "OBJECTIVES",
    "OBJECTIVE_WORDS",
    "EhrBertConfig",
    "EhrBertForMaskedLM",
    "EhrBertModel",
    "EhrBigBirdConfig",
    "EhrBigBirdForMaskedLM",
    "EhrBigBirdModel",
    "EhrBiLstmConfig",
    "EhrBiLstmForMaskedLM",
    "EhrBiLstmModel",
    "EhrCehrBertConfig",
    "EhrCehrBertForMaskedLM",
    "EhrCehrBertModel",
    "EhrLlamaConfig",
    "EhrLlamaForCausalLM",
    "EhrLlamaModel",
    "EhrMamba2Config",
    "EhrMamba2ForCausalLM",
    "EhrMamba2Model",
    "EhrMambaConfig",
    "EhrMambaForCausalLM",
    "EhrMambaModel",
    "EhrModernBertConfig",
    "EhrModernBertForMaskedLM",
    "EhrModernBertModel",
    "EhrXLNetConfig",
    "EhrXLNetLMHeadModel",
    "EhrXLNetModel",
    "build_meta_model",
    "build_model",
    "head_auto_class",
    "is_causal",
    "register_auto_classes",
]

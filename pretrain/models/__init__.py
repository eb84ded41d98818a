"""EHR foundation-model backbones as HF ``transformers`` classes: Llama, Mamba, Mamba2 (causal NTP) and BERT
(MLM), over the EHR embeddings of 001. Importing this package registers every config/model with the Auto
classes (``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``, ``AutoModelForMaskedLM``), so
``save_pretrained`` folders load back through ``AutoModel*.from_pretrained``.

Batch contract: every model's ``forward`` takes the keys of ``ehrfm.data_shards.schema.BATCH_KEYS`` plus
``labels`` as keyword arguments. None of the models holds any parallelism.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from .bert import EhrBertForMaskedLM, EhrBertModel
from .configuration import CONFIG_CLASSES, EhrBertConfig, EhrLlamaConfig, EhrMamba2Config, EhrMambaConfig
from .llama import EhrLlamaForCausalLM, EhrLlamaModel
from .mamba import EhrMambaForCausalLM, EhrMambaModel
from .mamba2 import EhrMamba2ForCausalLM, EhrMamba2Model

# architecture name -> (config, base model, pretraining head model)
ARCHITECTURES = {
    "llama": (EhrLlamaConfig, EhrLlamaModel, EhrLlamaForCausalLM),
    "mamba": (EhrMambaConfig, EhrMambaModel, EhrMambaForCausalLM),
    "mamba2": (EhrMamba2Config, EhrMamba2Model, EhrMamba2ForCausalLM),
    "bert": (EhrBertConfig, EhrBertModel, EhrBertForMaskedLM),
}


def register_auto_classes() -> None:
    """Idempotent registration of every architecture with the HF Auto classes."""
    for config_cls, base_cls, head_cls in ARCHITECTURES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        head_auto = AutoModelForMaskedLM if config_cls is EhrBertConfig else AutoModelForCausalLM
        head_auto.register(config_cls, head_cls, exist_ok=True)


def build_model(architecture: str, size: str = "tiny", head: bool = True, **overrides):
    """A freshly initialised model: ``build_model("mamba", "small", vocab_size=8000)``; head=False gives the
    base model (hidden states only)."""
    config_cls, base_cls, head_cls = ARCHITECTURES[architecture]
    config = config_cls.from_preset(size, **overrides)
    return (head_cls if head else base_cls)(config)


register_auto_classes()

__all__ = [
    "ARCHITECTURES",
    "CONFIG_CLASSES",
    "EhrBertConfig",
    "EhrBertForMaskedLM",
    "EhrBertModel",
    "EhrLlamaConfig",
    "EhrLlamaForCausalLM",
    "EhrLlamaModel",
    "EhrMamba2Config",
    "EhrMamba2ForCausalLM",
    "EhrMamba2Model",
    "EhrMambaConfig",
    "EhrMambaForCausalLM",
    "EhrMambaModel",
    "build_model",
    "register_auto_classes",
]

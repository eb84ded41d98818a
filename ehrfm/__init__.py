"""ehrfm: foundation models for electronic health records."""
__version__ = "0.1.0"


def register_models() -> None:
    """Register the ehrfm backbones (ehr_llama, ehr_mamba, ehr_mamba2, ehr_bert) with transformers' Auto
    classes so ``AutoModel*.from_pretrained`` loads saved folders. Kept out of ``import ehrfm`` because it
    imports torch and transformers (seconds); ``import ehrfm.pretrain.models`` does the same."""
    from ehrfm.pretrain.models import register_auto_classes

    register_auto_classes()

"""ehrfm: foundation models for electronic health records."""
__version__ = "0.1.0"


def register_models() -> None:
    """Register the ehrfm backbones (ehr_llama, ehr_mamba, ehr_mamba2, ehr_bert) with transformers' Auto
    classes now. ``import ehrfm`` already arranges this lazily (see ``ehrfm._auto_register``)."""
    from ehrfm._auto_register import register_now

    register_now()


from ehrfm import _auto_register  # noqa: E402

_auto_register.install()

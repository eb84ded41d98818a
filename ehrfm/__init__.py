"""ehrfm: foundation models for electronic health records.

``import ehrfm`` is light (no torch, no transformers) and changes nothing outside ehrfm. The backbones join
transformers' Auto classes when their package is imported::

    import ehrfm.pretrain.models          # registers ehr_llama, ehr_mamba, ehr_mamba2, ehr_bert, ehr_xlnet, ehr_modernbert
    model = AutoModelForCausalLM.from_pretrained(HFDIR)   # an `ehrfm export` folder

(an export also loads anywhere with ``trust_remote_code=True``: its modeling code is vendored).
"""

__version__ = "0.1.0"

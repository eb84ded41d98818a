"""The cache keyword of HF's classes across transformers 5.x.

transformers 5.24 renamed both ``past_key_values`` (attention models) and ``cache_params`` (Mamba) to
``cache``: forward arguments, ``prepare_inputs_for_generation``, ``create_causal_mask`` and the output
dataclass fields. Our models take any of the names and hand HF's layers, mask helpers and output classes the
one the installed version defines, so cached generation keeps its state on both sides of the rename.
"""

from __future__ import annotations

from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.mamba.modeling_mamba import MambaOutput

_OLD_NAMES = ("cache", "cache_params", "past_key_values")
#: the names HF's installed classes use for the cache (arguments and output fields)
HF_CACHE_NAME = "cache" if "cache" in MambaOutput.__dataclass_fields__ else "cache_params"
HF_KV_CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache(cache, old_name_value, kwargs: dict):
    """The cache given under any of its names; the others are removed from ``kwargs``. None when none is."""
    found = cache if cache is not None else old_name_value
    for name in _OLD_NAMES:
        value = kwargs.pop(name, None)
        if found is None:
            found = value
    return found


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` under the installed HF Mamba name (mixers, ``Mamba*Output``)."""
    return {HF_CACHE_NAME: cache}


def kv_cache_kwargs(cache) -> dict:
    """``{name: cache}`` under the installed HF attention name (decoder layers, masks, ``*OutputWithPast``)."""
    return {HF_KV_CACHE_NAME: cache}


def output_cache(output):
    """The cache stored in an HF output dataclass under whichever field name it has (only real fields are
    read: newer versions keep the old names as properties that warn)."""
    fields = getattr(output, "__dataclass_fields__", {})
    for name in _OLD_NAMES:
        if name in fields and getattr(output, name) is not None:
            return getattr(output, name)
    return None

"""Configurations of the EHR backbones: the HF config of each backbone plus the EHR embedding fields.

Each class subclasses the HF config of its backbone (so every HF field keeps its meaning and name) and adds
the fields of ``EhrEmbeddingFields``. Size presets follow 003 Table 5 (Tiny / Small / Medium); every field
can be overridden: ``EhrLlamaConfig.from_preset("small", vocab_size=8000, num_hidden_layers=2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    BertConfig,
    BigBirdConfig,
    LlamaConfig,
    Mamba2Config,
    MambaConfig,
    ModernBertConfig,
    PretrainedConfig,
    XLNetConfig,
)

from ...data_shards.schema import NUM_TOKEN_TYPES, PAD_ID

# 003 used a 4470-token vocabulary; the real size comes from the tokenizer of the data stage.
DEFAULT_VOCAB_SIZE = 4470
EMBEDDING_COMBINE = ("concat_project", "sum")


@dataclass(kw_only=True)
class EhrEmbeddingFields:
    """Fields of the EHR embedding layer (``embeddings.EhrEmbeddings``), shared by every backbone config.

    embedding_combine: "concat_project" (001 C.2: concatenate concept, time and age embeddings and project
        back to hidden_size, then add the other attribute embeddings) or "sum" (001 eq. 1: project time and age
        to hidden_size and add everything).
    time_embedding_size: width of each Time2Vec embedding (time, age); 001 uses 32.
    age_scale: multiplies `ages` (years) before Time2Vec; time_scale multiplies `times` (weeks since epoch).
        Defaults map both to decades so that the initial Time2Vec frequencies see inputs of order 1-10.
    max_visit_orders: rows of the visit-order table; larger visit numbers share the last row.
    num_visit_segments: rows of the visit-segment table (0 = [CLS]/special/pad, 1 and 2 alternate).
    embedding_dropout: dropout after the embedding LayerNorm.
    """

    type_vocab_size: int = NUM_TOKEN_TYPES
    embedding_combine: str = "concat_project"
    time_embedding_size: int = 32
    age_scale: float = 0.1
    time_scale: float = 1.0 / 520.0
    max_visit_orders: int = 512
    num_visit_segments: int = 3
    embedding_dropout: float = 0.1
    embedding_layer_norm_eps: float = 1e-5

    def validate_ehr_fields(self) -> None:
        if self.embedding_combine not in EMBEDDING_COMBINE:
            raise ValueError(f"embedding_combine must be one of {EMBEDDING_COMBINE}, got {self.embedding_combine!r}")
        if self.type_vocab_size < NUM_TOKEN_TYPES:
            raise ValueError(f"type_vocab_size must be >= {NUM_TOKEN_TYPES} (schema.TokenType)")


class _PresetMixin:
    """``from_preset(size, **overrides)`` over the class attribute ``PRESETS`` {size: {field: value}}."""

    PRESETS: dict[str, dict] = {}

    @classmethod
    def from_preset(cls, size: str = "tiny", **overrides):
        size = size.lower()
        if size not in cls.PRESETS:
            raise ValueError(f"unknown size {size!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[size], **overrides})


_COMMON = dict(vocab_size=DEFAULT_VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None)
# 003 Table 5: d_m 256/512/512, n_m 4/4/6, n_h 4/4/8, d_f 512/1024/2048 (transformers). "mini" is ehrfm's own
# laptop size (not in 003): half Tiny's width and depth, about 4x fewer FLOPs per token, so that the demo's
# pretraining passes the bigram reference within its CPU budget (README "Recipes").
_TRANSFORMER_SIZES = {
    "mini": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "medium": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
}
# 003 Table 5: Mamba blocks n_b 2/6/12; Mamba2 head dim 32/64/64 (16 heads at expand 2)
_MAMBA_SIZES = {
    "mini": dict(hidden_size=128, num_hidden_layers=2),
    "tiny": dict(hidden_size=256, num_hidden_layers=2),
    "small": dict(hidden_size=512, num_hidden_layers=6),
    "medium": dict(hidden_size=512, num_hidden_layers=12),
}
_MAMBA2_HEAD_DIM = {"mini": 32, "tiny": 32, "small": 64, "medium": 64}
# Paper 001 (EhrMamba) Appendix C: the configurations of its comparison set, as the size "paper001" of each
# baseline backbone (001 gives no parameter counts for them). Dropout 0.1 everywhere (HF's default here).
PAPER001_SIZE = "paper001"
_PAPER001_TRANSFORMER = dict(hidden_size=768, num_hidden_layers=6, intermediate_size=3072, time_embedding_size=32)
# 001 Appendix C, EhrMamba: embedding 768, 32 Mamba blocks, state size 16, convolution kernel 4
_PAPER001_MAMBA = dict(hidden_size=768, num_hidden_layers=32, time_embedding_size=32)


class EhrLlamaConfig(_PresetMixin, LlamaConfig, EhrEmbeddingFields):
    """Llama (RoPE, SwiGLU, RMSNorm pre-norm; causal NTP) over EHR embeddings."""

    model_type = "ehr_llama"
    # class defaults = the Tiny preset (HF's defaults are a 7B model)
    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    PRESETS = {k: {**_COMMON, "max_position_embeddings": 2048, **v} for k, v in _TRANSFORMER_SIZES.items()}

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_ehr_fields()


class EhrBertConfig(_PresetMixin, BertConfig, EhrEmbeddingFields):
    """BERT (absolute positions, GeLU, post-LayerNorm; bidirectional MLM) over EHR embeddings.

    BERT's own ``type_vocab_size`` is the token-type table here, sized by ``schema.TokenType``."""

    model_type = "ehr_bert"
    type_vocab_size: int = NUM_TOKEN_TYPES
    # class defaults = the Tiny preset
    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048
    pad_token_id: int | None = PAD_ID
    PRESETS = {k: {**_COMMON, "max_position_embeddings": 2048, **v} for k, v in _TRANSFORMER_SIZES.items()}

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_ehr_fields()


class EhrMambaConfig(_PresetMixin, MambaConfig, EhrEmbeddingFields):
    """Mamba v1 (selective SSM blocks, RMSNorm pre-norm; causal NTP) over EHR embeddings (001 C.1)."""

    model_type = "ehr_mamba"
    # class defaults = the Tiny preset
    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    num_hidden_layers: int = 2
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    PRESETS = {
        k: {**_COMMON, "state_size": 16, "expand": 2, "conv_kernel": 4, **v}
        for k, v in {**_MAMBA_SIZES, PAPER001_SIZE: _PAPER001_MAMBA}.items()
    }

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_ehr_fields()


class EhrMamba2Config(_PresetMixin, Mamba2Config, EhrEmbeddingFields):
    """Mamba2 (SSD, scalar A per head, gated RMSNorm; causal NTP) over EHR embeddings."""

    model_type = "ehr_mamba2"
    # class defaults = the Tiny preset
    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_heads: int = 16
    head_dim: int = 32
    state_size: int = 128
    n_groups: int = 1
    chunk_size: int = 64
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    PRESETS = {
        k: {
            **_COMMON,
            "expand": 2,
            "state_size": 128,
            "n_groups": 1,
            "head_dim": _MAMBA2_HEAD_DIM[k],
            "num_heads": 2 * v["hidden_size"] // _MAMBA2_HEAD_DIM[k],
            "chunk_size": 64,
            **v,
        }
        for k, v in _MAMBA_SIZES.items()
    }

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_ehr_fields()


class EhrXLNetConfig(_PresetMixin, XLNetConfig, EhrEmbeddingFields):
    """XLNet (relative positions, GeLU, post-LayerNorm; permutation LM) over EHR embeddings.

    HF's alias names (hidden_size, num_attention_heads, num_hidden_layers, and here intermediate_size for d_inner)
    are accepted like everywhere else in ehrfm; d_head follows d_model // n_head. No absolute positions and no
    length limit (XLNet has none). embedding_dropout defaults to 0: XLNet drops its input embeddings itself.
    """

    model_type = "ehr_xlnet"
    attribute_map = {**XLNetConfig.attribute_map, "intermediate_size": "d_inner"}
    # class defaults = the Tiny preset
    vocab_size: int = DEFAULT_VOCAB_SIZE
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_inner: int = 512
    mem_len: int | None = None
    use_mems_eval: bool = False
    embedding_dropout: float = 0.0
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    PRESETS = {k: {**_COMMON, **v} for k, v in _TRANSFORMER_SIZES.items()}

    def __post_init__(self, **kwargs):
        # XLNetConfig derives d_head before HF applies the alias kwargs: apply them first
        for alias, field in self.attribute_map.items():
            if alias in kwargs and field != "vocab_size":
                setattr(self, field, kwargs.pop(alias))
        self.d_head = self.d_model // self.n_head
        super().__post_init__(**kwargs)
        self.validate_ehr_fields()


class EhrModernBertConfig(_PresetMixin, ModernBertConfig, EhrEmbeddingFields):
    """ModernBERT (RoPE, GeGLU, pre-LayerNorm without biases, global attention every third layer and a local
    window of ``local_attention`` tokens otherwise; MLM) over EHR embeddings. Dropouts are 0.1 (003 P:98: "in
    all dropout layers"); HF's defaults are 0."""

    model_type = "ehr_modernbert"
    # ModernBertConfig declares embedding_dropout too (0.0): re-declared so that ehrfm's default wins
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    mlp_dropout: float = 0.1
    # class defaults = the Tiny preset
    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    PRESETS = {k: {**_COMMON, "max_position_embeddings": 2048, **v} for k, v in _TRANSFORMER_SIZES.items()}

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_ehr_fields()


CONFIG_CLASSES = {
    "llama": EhrLlamaConfig,
    "mamba": EhrMambaConfig,
    "mamba2": EhrMamba2Config,
    "bert": EhrBertConfig,
    "xlnet": EhrXLNetConfig,
    "modernbert": EhrModernBertConfig,
}


class EhrBigBirdConfig(_PresetMixin, BigBirdConfig, EhrEmbeddingFields):
    """BigBird (block-sparse attention: sliding + global + random blocks; BERT-style post-LayerNorm encoder,
    bidirectional MLM) over EHR embeddings: 001's BigBird baseline, and MultiBird when finetuned with MPF.

    ``attention_type`` "block_sparse" runs HF's block-sparse attention on unpacked rows longer than
    ``(5 + 2 * num_random_blocks) * block_size`` tokens; shorter or packed rows use full attention (see
    ``bigbird.py``). 001 (Appendix C): hidden 768, 6 layers, 12 heads, intermediate 3072, context 2048; block
    size and random blocks are not given in 001: HF's defaults (64, 3) are kept."""

    model_type = "ehr_bigbird"
    type_vocab_size: int = NUM_TOKEN_TYPES
    # class defaults = the Tiny preset
    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048
    hidden_act: str = "gelu_new"
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sep_token_id: int | None = None
    PRESETS = {
        **{k: {**_COMMON, "max_position_embeddings": 2048, **v} for k, v in _TRANSFORMER_SIZES.items()},
        PAPER001_SIZE: {
            **_COMMON,
            **_PAPER001_TRANSFORMER,
            "num_attention_heads": 12,
            "max_position_embeddings": 2048,
        },
    }

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_ehr_fields()


class EhrCehrBertConfig(EhrBertConfig):
    """CEHR-BERT (Pang et al. 2021) as 001 configures it: BERT over EHR embeddings whose concept/time/age
    concatenation is projected through tanh, pretrained with MLM plus visit-type prediction (``cehrbert.py``).

    visit_type_loss_weight: weight of the visit-type term added to the MLM loss (CEHR-BERT sums the two).
    visit_type_token_ids: vocabulary ids of the visit-type codes, the classes of visit-type prediction (set by
        ``ehrfm pretrain`` from the data's vocabulary; empty = MLM only)."""

    model_type = "ehr_cehrbert"
    visit_type_loss_weight: float = 1.0
    visit_type_token_ids: list[int] | tuple[int, ...] = ()
    PRESETS = {
        **EhrBertConfig.PRESETS,
        PAPER001_SIZE: {**_COMMON, **_PAPER001_TRANSFORMER, "num_attention_heads": 8, "max_position_embeddings": 512},
    }


class EhrBiLstmConfig(_PresetMixin, PretrainedConfig, EhrEmbeddingFields):
    """A stack of bidirectional LSTM layers over EHR embeddings: 001's LSTM baseline (not pretrained in 001;
    ehrfm can still pretrain it with MLM, its bidirectional objective).

    hidden_size: width of the embeddings and of every layer's output (forward and backward states
        concatenated), so each direction has ``hidden_size // 2`` units (001: embeddings 768, LSTM hidden 384).
    num_hidden_layers: stacked bidirectional layers (001: 6). hidden_dropout_prob: dropout between layers.
    hidden_act / layer_norm_eps: the MLM head's transform (as BERT's)."""

    model_type = "ehr_bilstm"
    vocab_size: int = DEFAULT_VOCAB_SIZE
    hidden_size: int = 256
    num_hidden_layers: int = 4
    hidden_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048  # context the presets were sized for (the LSTM has no position table)
    pad_token_id: int | None = PAD_ID
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    PRESETS = {
        **{
            k: {**_COMMON, "hidden_size": v["hidden_size"], "num_hidden_layers": v["num_hidden_layers"]}
            for k, v in _TRANSFORMER_SIZES.items()
        },
        PAPER001_SIZE: {
            **_COMMON,
            "hidden_size": 768,
            "num_hidden_layers": 6,
            "time_embedding_size": 32,
            "max_position_embeddings": 512,
        },
    }

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_ehr_fields()
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even (two LSTM directions), got {self.hidden_size}")

    @property
    def lstm_hidden_size(self) -> int:
        return self.hidden_size // 2


CONFIG_CLASSES.update(bigbird=EhrBigBirdConfig, cehrbert=EhrCehrBertConfig, bilstm=EhrBiLstmConfig)

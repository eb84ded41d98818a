"""EHR embeddings (Time2Vec, special-token zeroing, sum vs concat_project), configs/presets and the
packing helpers (positions, block masks)."""

import pytest
import torch

from ehrfm.data_shards.schema import NUM_TOKEN_TYPES, TokenType
from ehrfm.pretrain.models import masking
from ehrfm.pretrain.models.configuration import CONFIG_CLASSES, EhrLlamaConfig
from ehrfm.pretrain.models.embeddings import EhrEmbeddings, Time2Vec


def make_embeddings(combine, positions=False):
    torch.manual_seed(0)
    config = EhrLlamaConfig.from_preset(
        "tiny",
        hidden_size=16,
        num_attention_heads=2,
        time_embedding_size=4,
        embedding_combine=combine,
        embedding_dropout=0.0,
        max_position_embeddings=32,
    )
    return EhrEmbeddings(config, use_position_embeddings=positions).eval()


def streams(types):
    n = len(types)
    return {
        "type_ids": torch.tensor([types]),
        "ages": torch.linspace(30, 31, n)[None],
        "times": torch.linspace(2600, 2610, n)[None],
        "visit_segments": torch.tensor([[1 + i % 2 for i in range(n)]]),
        "visit_orders": torch.tensor([[1 + i // 2 for i in range(n)]]),
    }


def test_time2vec_formula():
    t2v = Time2Vec(5)
    tau = torch.tensor([[0.5, -2.0]])
    out = t2v(tau)
    w, b = t2v.weight.detach(), t2v.bias.detach()
    for i, value in enumerate([0.5, -2.0]):
        expected = torch.cat([w[:1] * value + b[:1], torch.sin(w[1:] * value + b[1:])])
        torch.testing.assert_close(out[0, i].detach(), expected)


@pytest.mark.parametrize("combine", ["concat_project", "sum"])
def test_special_tokens_ignore_time_age_segment_order(combine):
    emb = make_embeddings(combine, positions=True)
    types = [TokenType.CLS, TokenType.VS, TokenType.DX, TokenType.LAB, TokenType.VE, TokenType.REG, TokenType.INTERVAL]
    concept = torch.randn(1, len(types), 16)
    base = streams(types)
    changed = {
        "type_ids": base["type_ids"],
        "ages": base["ages"] + 7.0,
        "times": base["times"] + 100.0,
        "visit_segments": 3 - base["visit_segments"],
        "visit_orders": base["visit_orders"] + 3,
    }
    with torch.no_grad():
        a, b = emb(concept, **base), emb(concept, **changed)
    special = torch.tensor([t not in (TokenType.DX, TokenType.LAB) for t in types])
    torch.testing.assert_close(a[0, special], b[0, special])
    assert (a[0, ~special] - b[0, ~special]).abs().amax(-1).min() > 1e-3
    # each attribute alone changes event tokens
    for key in ("ages", "times", "visit_segments", "visit_orders"):
        with torch.no_grad():
            c = emb(concept, **{**base, key: changed[key]})
        assert (a[0, ~special] - c[0, ~special]).abs().max() > 1e-4, key


def test_sum_mode_without_streams_is_normalized_concept():
    emb = make_embeddings("sum")
    concept = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(emb(concept), emb.LayerNorm(concept))


def test_concat_project_mode_projects_concept_time_age():
    emb = make_embeddings("concat_project")
    concept = torch.randn(1, 3, 16)
    s = streams([TokenType.DX, TokenType.MED, TokenType.PRO])
    with torch.no_grad():
        time_f = emb.time_embeddings(s["times"] * emb.time_scale)
        age_f = emb.age_embeddings(s["ages"] * emb.age_scale)
        expected = emb.concept_projection(torch.cat([concept, time_f, age_f], -1))
        expected = expected + emb.token_type_embeddings(s["type_ids"])
        expected = expected + emb.visit_segment_embeddings(s["visit_segments"])
        expected = expected + emb.visit_order_embeddings(s["visit_orders"])
        torch.testing.assert_close(emb(concept, **s), emb.LayerNorm(expected))


def test_position_embeddings_only_when_requested():
    assert make_embeddings("sum").position_embeddings is None
    assert make_embeddings("sum", positions=True).position_embeddings is not None


def test_presets_follow_003_table5_and_are_overridable():
    llama = CONFIG_CLASSES["llama"]
    assert [llama.from_preset(s).hidden_size for s in ("tiny", "small", "medium")] == [256, 512, 512]
    assert [llama.from_preset(s).num_hidden_layers for s in ("tiny", "small", "medium")] == [4, 4, 6]
    assert [llama.from_preset(s).num_attention_heads for s in ("tiny", "small", "medium")] == [4, 4, 8]
    assert [llama.from_preset(s).intermediate_size for s in ("tiny", "small", "medium")] == [512, 1024, 2048]
    mamba, mamba2 = CONFIG_CLASSES["mamba"], CONFIG_CLASSES["mamba2"]
    assert [mamba.from_preset(s).num_hidden_layers for s in ("tiny", "small", "medium")] == [2, 6, 12]
    assert [mamba2.from_preset(s).head_dim for s in ("tiny", "small", "medium")] == [32, 64, 64]
    assert [mamba2.from_preset(s).num_heads for s in ("tiny", "small", "medium")] == [16, 16, 16]
    custom = llama.from_preset("small", vocab_size=123, num_hidden_layers=1)
    assert (custom.vocab_size, custom.num_hidden_layers, custom.hidden_size) == (123, 1, 512)
    assert custom.type_vocab_size == NUM_TOKEN_TYPES
    with pytest.raises(ValueError):
        llama.from_preset("huge")
    with pytest.raises(ValueError):
        llama.from_preset("tiny", embedding_combine="product")


def test_positions_restart_per_document():
    docs = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(masking.position_ids_per_document(docs), expected)
    assert masking.document_starts(docs)[0].nonzero().view(-1).tolist() == [3, 5, 6]


@pytest.mark.parametrize("causal", [True, False])
def test_block_mask_matches_definition(causal):
    docs = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    mask = masking.packed_attention_mask(docs, causal=causal, dtype=torch.float32, attn_implementation="sdpa")
    additive = masking.packed_attention_mask(docs, causal=causal, dtype=torch.float32, attn_implementation="eager")
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(6):
            for j in range(6):
                allowed = i == j or (docs[b, i] == docs[b, j] != 0 and (j <= i or not causal))
                assert bool(mask[b, 0, i, j]) == allowed
                assert (additive[b, 0, i, j] == 0) == allowed


def test_pad_queries_never_produce_nan():
    docs = torch.tensor([[1, 1, 0, 0]])
    mask = masking.packed_attention_mask(docs, causal=True, dtype=torch.float32, attn_implementation="sdpa")
    q = torch.randn(1, 2, 4, 8)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.isfinite(out).all()


def test_flash_varlen_lengths():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    kwargs = masking.flash_varlen_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10]
    assert kwargs["max_length_q"] == 4

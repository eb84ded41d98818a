"""ANAA swapped into tiny randomly initialised HF models (no downloads): eval == manual ANAA, training adds
noise, remove() restores the original attention, Mamba is refused."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ehrfm.finetune.anaa import ANAAConfig, anaa_finetuning, enable_anaa
from ehrfm.kernels import anaa_attention

B, N, VOCAB = 2, 11, 40


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    am[1, 7:] = 0
    return ids, am


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg)


def _capture(module):
    seen = {}

    def hook(_m, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, out=output[0])

    return seen, module.register_forward_hook(hook, with_kwargs=True)


def test_llama_eval_equals_manual_causal_anaa():
    model = _llama().eval()
    ids, am = _batch()
    attn = model.model.layers[0].self_attn
    with anaa_finetuning(model, ANAAConfig(sigma_eh=1.0)):
        seen, h = _capture(attn)
        model(input_ids=ids, attention_mask=am)
        h.remove()
    hs = seen["kwargs"]["hidden_states"]
    cos, sin = seen["kwargs"]["position_embeddings"]
    hd = attn.head_dim
    q, k, v = (proj(hs).view(B, N, -1, hd).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    o = anaa_attention(
        q.double(),
        k.double(),
        v.double(),
        sigma_eh=1.0,
        variant="causal",
        training=False,
        attention_mask=am.bool(),
        impl="reference",
    )
    manual = attn.o_proj(o.float().transpose(1, 2).reshape(B, N, -1))
    torch.testing.assert_close(seen["out"], manual, rtol=1e-4, atol=1e-5)


def test_bert_eval_equals_manual_symmetric_anaa():
    model = _bert().eval()
    ids, am = _batch()
    sa = model.encoder.layer[0].attention.self
    with anaa_finetuning(model, ANAAConfig(sigma_eh=0.33)):
        seen, h = _capture(sa)
        model(input_ids=ids, attention_mask=am)
        h.remove()
    hs = seen["kwargs"].get("hidden_states", seen["args"][0] if seen["args"] else None)
    hd = sa.attention_head_size
    q, k, v = (proj(hs).view(B, N, -1, hd).transpose(1, 2) for proj in (sa.query, sa.key, sa.value))
    o = anaa_attention(
        q.double(),
        k.double(),
        v.double(),
        sigma_eh=0.33,
        variant="symmetric",
        training=False,
        attention_mask=am.bool(),
        impl="reference",
    )
    torch.testing.assert_close(
        seen["out"].reshape(B, N, -1), o.float().transpose(1, 2).reshape(B, N, -1), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("build", [_llama, _bert])
def test_training_adds_noise_eval_deterministic_and_remove_restores(build):
    model = build()
    ids, am = _batch()

    def run():
        out = model(input_ids=ids, attention_mask=am)
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state).detach()

    model.eval()
    base = run()
    handle = enable_anaa(model, ANAAConfig(sigma_eh=1.0))
    ev = run()
    assert torch.equal(ev, run())  # eval: mu term, deterministic
    assert (ev - base).abs().max() > 1e-4  # ANAA is active
    model.train()
    torch.manual_seed(1)
    t1 = run()
    torch.manual_seed(1)
    assert torch.equal(t1, run())  # seeded
    t2 = run()
    assert (t1 - t2).abs().max() > 1e-4 and (t1 - ev).abs().max() > 1e-4  # noise in training
    loss = model(input_ids=ids, attention_mask=am)
    (loss.logits if hasattr(loss, "logits") else loss.last_hidden_state).square().mean().backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in model.parameters()
        if p.requires_grad and p.grad is not None
    )
    handle.remove()
    model.eval()
    torch.testing.assert_close(run(), base)


def test_rna_mode_differs_from_anaa():
    model = _llama().eval()
    ids, am = _batch()
    outs = []
    for mode in ("anaa", "rna"):
        with anaa_finetuning(model, ANAAConfig(sigma_eh=1.0, mode=mode)):
            outs.append(model(input_ids=ids, attention_mask=am).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_mamba_refused():
    model = MambaModel(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1))
    with pytest.raises(ValueError, match="Mamba.*no attention"):
        enable_anaa(model, ANAAConfig())


@pytest.mark.parametrize("causal", [True, False])
def test_documents_recovered_from_4d_mask(causal):
    """Fallback when the model is called without document_ids / 2D attention_mask keywords."""
    from ehrfm.finetune.anaa import _docs_from_4d

    doc = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [4, 4, 4, 4, 4, 4, 4, 0]])
    allowed = (doc[:, :, None] == doc[:, None, :]) & (doc != 0)[:, None, :]
    if causal:
        allowed &= torch.ones(8, 8, dtype=torch.bool).tril()
    got = _docs_from_4d(allowed[:, None])
    assert torch.equal(got != 0, doc != 0)
    assert torch.equal(got[:, 1:] != got[:, :-1], doc[:, 1:] != doc[:, :-1])
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    assert torch.equal(_docs_from_4d(additive), got)


def test_enable_twice_refused_and_cli_flags():
    from ehrfm.cli import parse_args
    from ehrfm.finetune.cli import build_config

    model = _llama()
    handle = enable_anaa(model)
    with pytest.raises(ValueError, match="already enabled"):
        enable_anaa(model)
    handle.remove()
    base = ["finetune", "--model", "M", "--data", "D", "--out", "F"]
    assert not build_config(parse_args(base)).anaa.enabled
    cfg = build_config(
        parse_args([*base, "--anaa", "--anaa-sigma-eh", "1.0", "--anaa-mode", "rna", "--no-anaa.detach-sigma"])
    ).anaa
    assert cfg == ANAAConfig(enabled=True, sigma_eh=1.0, mode="rna", detach_sigma=False)


@pytest.mark.parametrize("arch", ["llama", "bert", "mamba", "mamba2", "xlnet", "modernbert"])
def test_ehrfm_backbones_packed_rows_equal_documents_alone(arch):
    """On the ehrfm backbones (called with document_ids), a packed document's ANAA output equals the document
    run alone; Mamba and XLNet backbones are refused."""
    from ehrfm.pretrain.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, "tiny", head=False)
    if arch.startswith("mamba") or arch == "xlnet":
        with pytest.raises(ValueError, match="no attention"):
            enable_anaa(model)
        return
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    docs = torch.tensor([[1] * 5 + [2] * 7, [1] * 8 + [0] * 4])
    with anaa_finetuning(model.eval(), ANAAConfig(sigma_eh=1.0)):
        packed = model(input_ids=ids, document_ids=docs).last_hidden_state
        alone = model(input_ids=ids[:1, 5:], document_ids=torch.ones(1, 7, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(packed[:1, 5:], alone, rtol=1e-4, atol=1e-5)


def test_modernbert_anaa_runs_on_global_layers_only():
    from ehrfm.pretrain.models import build_model

    model = build_model("modernbert", "tiny", head=False)
    with anaa_finetuning(model, ANAAConfig()) as handle:
        assert [m.layer_idx for m in handle.modules] == [0, 3]  # global every third layer; 1, 2 are local

"""Every backbone: Tiny forward/backward, packed == unpacked, save/load round trip through the Auto classes,
generate(), patient embeddings, gradient checkpointing, bf16 autocast and HF weight-name compatibility."""

import re

import pytest
import torch
from transformers import AutoModel

import ehrfm.pretrain.models as models
from ehrfm.data_shards.schema import TokenType

ARCHS = ["llama", "mamba", "mamba2", "bert", "xlnet", "modernbert"]
CAUSAL = ["llama", "mamba", "mamba2"]
VOCAB = 40
# small shapes for the exact-equality tests; Mamba2 chunks of 4 so documents cross chunk boundaries
SMALL = {
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "mamba": dict(hidden_size=32, num_hidden_layers=2),
    "mamba2": dict(hidden_size=32, num_hidden_layers=2, head_dim=16, num_heads=4, state_size=8, chunk_size=4),
    "xlnet": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    # a local window of |i - j| <= 2 (documents are longer); layers 0 and 3 global, 1 and 2 local
    "modernbert": dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, local_attention=4
    ),
}
DROPOUTS = {
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "xlnet": ("dropout",),
    "modernbert": ("attention_dropout", "mlp_dropout"),
}


def small_model(arch, **overrides):
    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, time_embedding_size=8, embedding_dropout=0.0, **SMALL[arch], **overrides)
    kwargs.update(dict.fromkeys(DROPOUTS.get(arch, ()), 0.0))
    return models.build_model(arch, "tiny", **kwargs).eval()


def make_document(length, seed):
    """One patient sequence: [CLS] then visits of events with [VS]/[VE]/[REG] and realistic streams."""
    g = torch.Generator().manual_seed(seed)
    types = torch.randint(int(TokenType.DX), int(TokenType.OTHER) + 1, (length,), generator=g)
    types[0] = TokenType.CLS
    types[1] = TokenType.VS
    if length > 6:
        types[length // 2] = TokenType.VE
        types[length // 2 + 1] = TokenType.REG
    ids = torch.randint(20, VOCAB, (length,), generator=g)
    ids[0] = 3
    return {
        "input_ids": ids,
        "type_ids": types,
        "ages": 40 + torch.rand(length, generator=g).cumsum(0) * 0.01,
        "times": 2700 + torch.rand(length, generator=g).cumsum(0),
        "visit_segments": torch.where(torch.arange(length) > length // 2, 2, 1),
        "visit_orders": torch.where(torch.arange(length) > length // 2, 2, 1),
    }


def pad_rows(docs):
    """Unpacked batch: one document per row, right padded, attention_mask + labels (-100 on padding)."""
    length = max(len(d["input_ids"]) for d in docs)
    batch = {k: torch.zeros(len(docs), length, dtype=v.dtype) for k, v in docs[0].items()}
    batch["attention_mask"] = torch.zeros(len(docs), length, dtype=torch.long)
    for row, doc in enumerate(docs):
        n = len(doc["input_ids"])
        for k, v in doc.items():
            batch[k][row, :n] = v
        batch["attention_mask"][row, :n] = 1
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def pack_rows(rows, length):
    """Packed batch: each row concatenates its documents (document_ids 1..) and pads with document 0."""
    keys = list(rows[0][0].keys())
    batch = {k: torch.zeros(len(rows), length, dtype=rows[0][0][k].dtype) for k in keys}
    batch["document_ids"] = torch.zeros(len(rows), length, dtype=torch.long)
    for r, docs in enumerate(rows):
        at = 0
        for d, doc in enumerate(docs, start=1):
            n = len(doc["input_ids"])
            for k in keys:
                batch[k][r, at : at + n] = doc[k]
            batch["document_ids"][r, at : at + n] = d
            at += n
    batch["attention_mask"] = (batch["document_ids"] != 0).long()
    batch["labels"] = batch["input_ids"].masked_fill(batch["document_ids"] == 0, -100)
    return batch


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_forward_backward(arch):
    torch.manual_seed(0)
    model = models.build_model(arch, "tiny", vocab_size=VOCAB).train()
    assert model.config.hidden_size == 256
    batch = pad_rows([make_document(24, 1), make_document(17, 2)])
    if models.OBJECTIVES[arch] == "mlm":  # MLM: a few masked targets, the rest ignored
        labels = torch.full_like(batch["labels"], -100)
        labels[:, 3:20:4] = batch["input_ids"][:, 3:20:4]
        batch["labels"] = labels
    out = model(**batch)
    assert out.logits.shape == (2, 24, VOCAB)
    assert torch.isfinite(out.loss) and 2.0 < out.loss.item() < 6.0  # ~ln(40) at init
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and p.requires_grad]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def assert_documents_run_as_alone(model, docs, packed, sliced=()):
    """The logits of each packed document (rows of ``pack_rows([docs[:3], docs[3:]])``) equal those of the
    document run alone; the packed keys in ``sliced`` are cut to the document and passed too."""
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        at = {0: 0, 1: 0}
        for i, doc in enumerate(docs):
            row = 0 if i < 3 else 1
            span = slice(at[row], at[row] + len(doc["input_ids"]))
            extra = {k: packed[k][row : row + 1, span] for k in sliced}
            alone = model(**{k: v[None] for k, v in doc.items()}, **extra).logits[0]
            torch.testing.assert_close(packed_logits[row, span], alone, atol=1e-5, rtol=1e-5)
            at[row] = span.stop


@pytest.mark.parametrize(
    "arch,attn",
    [
        ("llama", "sdpa"),
        ("llama", "eager"),
        ("bert", "sdpa"),
        ("bert", "eager"),
        ("mamba", None),
        ("mamba2", None),
        ("xlnet", None),
        ("modernbert", "sdpa"),
        ("modernbert", "eager"),
    ],
)
def test_packed_equals_unpacked(arch, attn):
    model = small_model(arch)
    if attn:
        model.set_attn_implementation(attn)
        assert model.config._attn_implementation == attn
    docs = [make_document(n, seed) for seed, n in enumerate([7, 5, 9, 11, 6], start=10)]
    packed = pack_rows([docs[:3], docs[3:]], length=24)
    assert_documents_run_as_alone(model, docs, packed)
    if arch in CAUSAL:  # the NTP loss of a packed batch == the loss of the padded one-document-per-row batch
        with torch.no_grad():
            loss_packed = model(**packed).loss
            loss_padded = model(**pad_rows(docs)).loss
        torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)


def test_attention_needs_the_block_mask():
    """Restarting positions alone does not isolate packed documents: dropping document_ids changes logits."""
    model = small_model("llama")
    docs = [make_document(7, 1), make_document(9, 2)]
    packed = pack_rows([docs], length=16)
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        isolated = model(**inputs).logits
        positions = models.masking.position_ids_per_document(packed["document_ids"])
        leaky = model(**{k: v for k, v in inputs.items() if k != "document_ids"}, position_ids=positions).logits
    torch.testing.assert_close(isolated[:, :7], leaky[:, :7], atol=1e-5, rtol=1e-5)  # first doc: causal anyway
    assert (isolated[:, 7:] - leaky[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_round_trip(arch, tmp_path):
    model = small_model(arch)
    model.save_pretrained(tmp_path)
    loaded = models.head_auto_class(arch).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    batch = pad_rows([make_document(12, 3), make_document(8, 4)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
        base = AutoModel.from_pretrained(tmp_path).eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        assert torch.equal(base(**inputs).last_hidden_state, model.base_model(**inputs).last_hidden_state)


@pytest.mark.parametrize("arch", CAUSAL)
def test_generate_matches_greedy_loop(arch):
    model = small_model(arch)
    batch = pad_rows([make_document(10, 5), make_document(10, 6)])
    batch.pop("labels")
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    new = generated[:, 10:]
    assert new.shape == (2, 4) and new.min() >= 0 and new.max() < VOCAB
    # oracle: full recomputation without cache, streams extended by repeating their last value
    ids, streams = batch["input_ids"], {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        for _ in range(4):
            nxt = model(input_ids=ids, **streams, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            streams = {k: torch.cat([v, v[:, -1:]], dim=1) for k, v in streams.items()}
    assert torch.equal(generated, ids)
    # streams are optional: a bare token prompt generates too
    bare = model.generate(input_ids=batch["input_ids"], max_new_tokens=2, do_sample=False)
    assert bare.shape == (2, 12) and bare.max() < VOCAB


@pytest.mark.parametrize("arch", ARCHS)
def test_patient_embedding_per_sequence_and_per_document(arch):
    model = small_model(arch)
    docs = [make_document(7, 21), make_document(9, 22)]
    padded = pad_rows(docs)
    packed = pack_rows([docs], length=18)
    single = model.get_patient_embedding(padded)
    per_doc = model.get_patient_embedding(packed)
    assert single.shape == (2, 32) and per_doc.shape == (1, 2, 32)
    torch.testing.assert_close(per_doc[0], single, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        hidden = model.base_model(**{k: v for k, v in padded.items() if k != "labels"}).last_hidden_state
    expected = hidden[:, 0] if model.default_pooling == "first" else hidden[torch.arange(2), torch.tensor([6, 8])]
    torch.testing.assert_close(single, expected)
    reg = model.get_patient_embedding(padded, pooling="reg")
    torch.testing.assert_close(reg[0], hidden[0, 7 // 2 + 1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.filterwarnings("ignore:`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated")
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(arch):
    batch = pad_rows([make_document(12, 7), make_document(9, 8)])
    grads, calls = [], []
    for checkpointing in (False, True):
        model = small_model(arch).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        first_layer = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)][0][0]
        count = []  # HF checkpoints the layer's forward, so count a submodule's calls
        next(first_layer.children()).register_forward_hook(lambda *args: count.append(1))
        model(**batch).loss.backward()
        calls.append(len(count))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2]  # the checkpointed layer is recomputed in backward
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast(arch):
    model = small_model(arch).train()
    batch = pad_rows([make_document(12, 9), make_document(9, 10)])
    loss32 = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert abs(out.loss.item() - loss32.item()) < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "arch,hf_name",
    [
        ("llama", "LlamaForCausalLM"),
        ("mamba", "MambaForCausalLM"),
        ("mamba2", "Mamba2ForCausalLM"),
        ("bert", "BertForMaskedLM"),
        ("xlnet", "XLNetLMHeadModel"),
        ("modernbert", "ModernBertForMaskedLM"),
    ],
)
def test_backbone_weights_load_into_plain_hf_classes(arch, hf_name, tmp_path):
    """The backbone's tensors keep HF's names and shapes: a plain HF model loads them (extra EHR-embedding
    tensors are the only unexpected keys) and its transformer blocks equal ours."""
    import transformers

    model = small_model(arch)
    fields = {k: getattr(model.config, k) for k in model.config.to_diff_dict() if hasattr(model.config, k)}
    hf_config_cls = getattr(transformers, re.sub("(ForCausalLM|ForMaskedLM|LMHeadModel)$", "Config", hf_name))
    hf_fields = {
        k: v for k, v in fields.items() if k in {f.name for f in __import__("dataclasses").fields(hf_config_cls)}
    }
    if arch == "bert":
        hf_fields["type_vocab_size"] = model.config.type_vocab_size
    hf_model = getattr(transformers, hf_name)(hf_config_cls(**hf_fields))
    ours = model.state_dict()
    theirs = hf_model.state_dict()
    extra = {k for k in ours if k not in theirs}
    assert extra and all("ehr_embeddings" in k or k.startswith("bert.embeddings.") for k in extra), extra
    missing = {k for k in theirs if k not in ours}
    assert not missing, missing
    assert all(ours[k].shape == theirs[k].shape for k in theirs)


@pytest.mark.parametrize("arch", CAUSAL)
def test_left_padded_prompt_generates_like_the_unpadded_prompt(arch):
    model = small_model(arch)
    short, long_ = make_document(6, 31), make_document(10, 32)
    batch = {k: torch.stack([torch.cat([torch.zeros(4, dtype=v.dtype), v]), long_[k]]) for k, v in short.items()}
    batch["attention_mask"] = torch.ones(2, 10, dtype=torch.long)
    batch["attention_mask"][0, :4] = 0
    together = model.generate(**batch, max_new_tokens=3, do_sample=False)
    alone = model.generate(**{k: v[None] for k, v in short.items()}, max_new_tokens=3, do_sample=False)
    assert torch.equal(together[0, 10:], alone[0, 6:])


@pytest.mark.parametrize("arch", ["llama", "bert", "xlnet", "modernbert"])
def test_patient_embedding_is_differentiable(arch):
    model = small_model(arch).train()
    emb = model.get_patient_embedding(pad_rows([make_document(8, 41), make_document(6, 42)]))
    # a random projection: the plain sum of a (post-)LayerNorm output has zero gradient
    (emb * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_parameter_table_counts_real_models():
    from ehrfm.pretrain.cli import PAPER_PARAMS_M, parameter_table, sizes_of

    rows = parameter_table(vocab_size=4470)
    assert len(rows) == sum(len(sizes_of(c)) for c, _, _ in models.ARCHITECTURES.values())
    assert {r["architecture"] for r in rows} == set(PAPER_PARAMS_M)
    tiny_mamba = next(r for r in rows if r["architecture"] == "mamba" and r["size"] == "tiny")
    model = models.build_model("mamba", "tiny", vocab_size=4470)
    assert tiny_mamba["params_m"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    # same order of magnitude as 003 Table 5 (vocabulary, heads and EHR embeddings differ, see the CLI note)
    assert all(0.8 < r["params_m"] / r["paper_params_m"] < 2.0 for r in rows if r["paper_params_m"] is not None)
    # ehrfm's laptop size (no 003 row) is the smallest of every backbone
    assert all(
        r["paper_params_m"] is None
        and r["params_m"]
        < min(o["params_m"] for o in rows if o["architecture"] == r["architecture"] and o["size"] != "mini")
        for r in rows
        if r["size"] == "mini"
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_config_defaults_are_the_tiny_preset(arch):
    config_cls = models.ARCHITECTURES[arch][0]
    assert config_cls().to_dict() == config_cls.from_preset("tiny").to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_has_no_host_sync(arch):
    """Meta tensors have no data: any .item(), bool(), nonzero() or data-dependent shape in forward/backward
    raises. The whole packed training step must run on them."""
    with pytest.raises(Exception):  # noqa: B017 (the exception type differs across torch versions)
        torch.zeros(1, device="meta").item()
    with torch.device("meta"):
        model = models.build_model(arch, "tiny", vocab_size=VOCAB).train()
        batch = {
            k: torch.zeros(2, 16, dtype=torch.long)
            for k in ("input_ids", "type_ids", "visit_segments", "visit_orders", "position_ids", "labels")
        }
        batch.update(
            ages=torch.zeros(2, 16), times=torch.zeros(2, 16), document_ids=torch.ones(2, 16, dtype=torch.long)
        )
    out = model(**batch)
    out.loss.backward()
    assert out.logits.shape == (2, 16, VOCAB) and out.logits.device.type == "meta"


@pytest.mark.parametrize("arch", CAUSAL)
def test_cache_is_passed_under_the_installed_transformers_name(arch, monkeypatch):
    """transformers 5.24 renamed past_key_values/cache_params to cache; the old names must not be used."""
    import transformers.utils.generic as generic

    seen = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: seen.append(msg))
    model = small_model(arch)
    batch = pad_rows([make_document(10, 5), make_document(8, 6)])
    model(**batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert not [m for m in seen if "deprecated" in m]


def plm_batch(batch, probability=0.5, seed=3):
    from ehrfm.pretrain.objectives import plm_inputs

    return plm_inputs(batch, probability=probability, seed=seed)


def test_plm_inputs_draw_seeded_targets_never_a_documents_first_token():
    docs = [make_document(n, seed) for seed, n in enumerate([7, 5, 9, 11, 6], start=10)]
    packed = pack_rows([docs[:3], docs[3:]], length=24)
    plm = plm_batch(packed)
    again = plm_batch(packed)
    assert torch.equal(plm["plm_rank"], again["plm_rank"]) and torch.equal(plm["input_ids"], packed["input_ids"])
    targets = plm["plm_rank"] >= 0
    assert targets.any() and not targets[~plm_maskable(packed)].any()
    starts = models.masking.document_starts(packed["document_ids"])
    starts[:, 0] = True
    assert not targets[starts].any()
    assert torch.equal(plm["labels"] != -100, targets)
    assert torch.equal(plm["labels"][targets], packed["input_ids"][targets])


def plm_maskable(batch):
    from ehrfm.pretrain.objectives import maskable_positions

    return maskable_positions(batch)


def test_plm_packed_equals_unpacked():
    model = small_model("xlnet")
    docs = [make_document(n, seed) for seed, n in enumerate([7, 5, 9, 11, 6], start=10)]
    packed = plm_batch(pack_rows([docs[:3], docs[3:]], length=24))
    assert_documents_run_as_alone(model, docs, packed, sliced=("plm_rank",))


def test_plm_never_leaks_a_target_into_its_own_or_earlier_predictions():
    """Changing a target token changes neither its own query-stream logits nor those of targets before it in
    the factorization order, nor anything in another document; later targets do see it."""
    model = small_model("xlnet")
    docs = [make_document(12, 51), make_document(10, 52)]
    batch = plm_batch(pack_rows([docs], length=24), probability=0.6, seed=5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    rank, documents = batch["plm_rank"][0], batch["document_ids"][0]
    with torch.no_grad():
        reference = model(**inputs).logits[0]
        checked = 0
        for t in torch.nonzero(rank >= 0).view(-1).tolist():
            changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
            changed["input_ids"][0, t] = 20 + (int(inputs["input_ids"][0, t]) - 19) % (VOCAB - 20)
            logits = model(**changed).logits[0]
            same_doc = documents == documents[t]
            earlier = same_doc & (rank >= 0) & (rank <= rank[t])  # the target itself included
            frozen = earlier | ~same_doc | (same_doc & (rank < 0))  # context tokens never see targets
            torch.testing.assert_close(logits[frozen], reference[frozen], atol=1e-5, rtol=1e-5)
            later = same_doc & (rank > rank[t])
            if later.any():
                assert (logits[later] - reference[later]).abs().max() > 1e-4
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_modernbert_masks_equal_hf_modernbert_with_its_window(attn):
    """One unpadded document: our block/window masks give what HF ModernBertModel computes with its own."""
    from transformers.models.modernbert.modeling_modernbert import ModernBertModel

    model = small_model("modernbert")
    model.set_attn_implementation(attn)
    batch = pad_rows([make_document(16, 61)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = model.base_model
    with torch.no_grad():
        ours = base(**inputs).last_hidden_state
        raw = base.ehr_embeddings(
            base.embeddings.tok_embeddings(inputs["input_ids"]),
            inputs["type_ids"],
            inputs["ages"],
            inputs["times"],
            inputs["visit_segments"],
            inputs["visit_orders"],
        )
        theirs = ModernBertModel.forward(base, inputs_embeds=raw).last_hidden_state
        # without the window (all layers global) the result differs: the window is in effect
        masks = base.attention_masks(torch.ones(1, 16, dtype=torch.long), raw.dtype)
        assert not torch.equal(masks["full_attention"], masks["sliding_attention"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, kind", [("xlnet", "plm"), ("modernbert", "mlm")])
def test_objective_prepares_each_backbones_targets_and_validation_agrees(arch, kind):
    from ehrfm.pretrain.objectives import Objective

    model = small_model(arch)
    objective = Objective(arch, model, seed=0, rank=0, mlm_probability=0.3, plm_probability=0.3, first_code_id=20)
    assert objective.kind == kind and not objective.causal
    docs = [make_document(n, seed) for seed, n in enumerate([12, 9, 14], start=70)]
    batch = objective.prepare(pack_rows([docs[:2], docs[2:]], length=24), step=1, micro=0, device=torch.device("cpu"))
    assert ("plm_rank" in batch) == (kind == "plm") and (batch["labels"] != -100).any()
    with torch.no_grad():
        loss, _ = objective(model, batch)
        sums = objective.validation_sums(model, batch)
    torch.testing.assert_close(loss.double(), sums[0] / sums[1], atol=1e-5, rtol=1e-5)

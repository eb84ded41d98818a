"""LoRA: base weights untouched by training, only LoRA + heads trainable, merged and adapter-only saves
predict alike; targets per backbone. NEFTune: noise only in training, bounded by alpha / sqrt(L d), none on
padding."""

import json

import pytest
import torch

from ehrfm.finetune.config import FinetuneConfig
from ehrfm.finetune.data import FinetuneDataset, collate
from ehrfm.finetune.model import FinetuneModel, apply_lora, load_backbone, load_finetuned
from ehrfm.finetune.regularizers import attach_regularizers, hf_model, neftune_hook


def _base_weights(backbone):
    return {k: v.detach().clone() for k, v in hf_model(backbone).state_dict().items() if "lora_" not in k}


def test_lora_training_leaves_base_weights_untouched(llama_export, ft_data, tasks):
    torch.manual_seed(0)
    cfg = FinetuneConfig(method="alfia")
    cfg.lora.enabled = True
    backbone = apply_lora(load_backbone(llama_export), cfg)
    model = FinetuneModel(backbone, "alfia", tasks, cfg)
    before = _base_weights(backbone)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable)
    targeted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A" in n}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    ds = FinetuneDataset(ft_data, tasks, "finetune", 32)
    batch = collate([ds[i] for i in range(16)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch)["logits"], batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _base_weights(backbone)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("mamba", {"in_proj", "out_proj"}),
        ("bert", {"query", "key", "value", "dense"}),
        ("xlnet", {"layer_1", "layer_2"}),
        ("modernbert", {"Wqkv", "Wo", "Wi"}),
    ],
)
def test_lora_targets_per_backbone(arch, expected, ft_data, export_factory, tmp_path):
    cfg = FinetuneConfig()
    cfg.lora.enabled = True
    backbone = apply_lora(load_backbone(export_factory(tmp_path / arch, ft_data, arch)), cfg)
    names = [n for n, _ in backbone.named_parameters() if ".lora_A" in n]
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in names} == expected
    if arch == "mamba":
        assert not any("x_proj" in n or "dt_proj" in n for n in names)
    if arch == "bert":
        assert not any("embeddings" in n for n in names)


@pytest.mark.slow
def test_adapter_only_and_merged_saves_predict_alike(llama_export, ft_data, tasks, tmp_path):
    from ehrfm.finetune.train import finetune, predict

    outs = {}
    for save in ("merged", "adapter"):
        cfg = FinetuneConfig(method="per-task", context_length=32, epochs=1, learning_rate=1e-3, tasks=tasks[:1])
        cfg.lora.enabled, cfg.lora.save = True, save
        finetune(llama_export, ft_data, tmp_path / save, cfg)
        model, meta = load_finetuned(tmp_path / save)
        ds = FinetuneDataset(ft_data, meta["tasks"], "finetune_val", 32)
        outs[save] = predict(model, ds)["probability"]
    assert (tmp_path / "adapter" / "adapter").is_dir() and not (tmp_path / "adapter" / "backbone").exists()
    assert json.loads((tmp_path / "adapter" / "finetune.json").read_text())["base_model"]
    torch.testing.assert_close(torch.tensor(outs["merged"]), torch.tensor(outs["adapter"]), rtol=1e-4, atol=1e-5)


def test_neftune_noise_only_in_training_and_bounded():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 8, padding_idx=0)
    hook = emb.register_forward_hook(neftune_hook(5.0))
    ids = torch.tensor([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]])
    clean = emb.weight[ids].detach()
    emb.train()
    noisy = emb(ids).detach()
    diff = noisy - clean
    assert (diff[0, 4:] == 0).all()  # padding untouched
    bound0, bound1 = 5.0 / (4 * 8) ** 0.5, 5.0 / (6 * 8) ** 0.5  # alpha / sqrt(L d) with L real tokens
    assert diff[0, :4].abs().max() <= bound0 and diff[1].abs().max() <= bound1
    assert diff[0, :4].abs().max() > 0.5 * bound0
    emb.eval()
    assert torch.equal(emb(ids).detach(), clean)
    hook.remove()


def test_attach_regularizers_neftune_and_anaa_roundtrip(llama_export):
    from ehrfm.finetune.anaa import ANAAConfig

    backbone = load_backbone(llama_export)
    impl = backbone.config._attn_implementation
    regs = attach_regularizers(backbone, neftune_alpha=10.0, anaa=ANAAConfig())
    assert backbone.config._attn_implementation == "ehrfm_anaa" and regs.anaa_active
    assert backbone.get_input_embeddings()._forward_hooks
    regs.remove()
    assert backbone.config._attn_implementation == impl
    assert not backbone.get_input_embeddings()._forward_hooks


def test_freeze_is_a_probe_backbone_saved_unchanged(llama_export, ft_data, tasks, tmp_path):
    from safetensors.torch import load_file

    from ehrfm.finetune.train import finetune

    cfg = FinetuneConfig(
        method="per-task", context_length=24, epochs=1, learning_rate=1e-2, freeze=True, tasks=tasks[:1]
    )
    finetune(llama_export, ft_data, tmp_path / "probe", cfg)
    before = load_backbone(llama_export).state_dict()
    after = load_file(str(tmp_path / "probe" / "backbone" / "model.safetensors"))
    assert after and all(torch.equal(before[k], v) for k, v in after.items())
    model, meta = load_finetuned(tmp_path / "probe")
    assert meta["freeze"] and len(model.heads) == 1
    # evaluation defaults to the model's own tasks, not every task of the data
    from ehrfm.finetune.evaluate import evaluate

    metrics = evaluate(tmp_path / "probe", ft_data, "test", tmp_path / "eval", n_boot=10)
    assert list(metrics["tasks"]) == tasks[:1]

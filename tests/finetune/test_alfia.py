"""ALFIA (002 2.3): layer weights computed as eqs. 2-7 say (sum to 1 without gating, sigmoid gates with it),
fusion as eq. 8, output shapes, padding invariance; the ACH; ALFIA heads on every backbone."""

import math

import pytest
import torch

from ehrfm.finetune.config import FinetuneConfig
from ehrfm.finetune.heads import AdaptiveLayerFusion, AlfiaHead, AttentionalClassifierHead

B, NF, T, H = 3, 4, 7, 16


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = torch.randn(B, NF, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return layers, mask


def _manual_weights(alf: AdaptiveLayerFusion, layers, mask):
    """Eqs. 2-7 written out per row, independent of the module's vectorised code."""
    out = []
    for b in range(layers.shape[0]):
        real = mask[b].bool()
        s = torch.stack([layers[b, j][real].mean(0) for j in range(NF)])  # eq. 2
        q = alf.w_q(s.mean(0))  # eq. 3
        k, v = alf.w_k(s), alf.w_v(s)  # eqs. 4-5
        heads = alf.num_heads
        d = H // heads
        per_head_scores, per_head_ctx = [], []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            sc = torch.softmax(q[sl] @ k[:, sl].T / math.sqrt(d), dim=-1)  # eq. 6
            per_head_scores.append(sc)
            per_head_ctx.append(sc @ v[:, sl])
        if not alf.gating:
            out.append(torch.stack(per_head_scores).mean(0))
        else:
            ctx = alf.w_o(torch.cat(per_head_ctx))
            out.append(torch.sigmoid(alf.gate(ctx)))  # eq. 7
    return torch.stack(out)


@pytest.mark.parametrize("gating", [False, True])
def test_layer_weights_follow_eqs_2_to_7(gating):
    torch.manual_seed(0)
    alf = AdaptiveLayerFusion(H, NF, num_heads=4, gating=gating).eval()
    layers, mask = _inputs()
    lam = alf.layer_weights(layers, mask)
    assert lam.shape == (B, NF)
    torch.testing.assert_close(lam, _manual_weights(alf, layers, mask), rtol=1e-5, atol=1e-6)
    if gating:
        assert ((lam > 0) & (lam < 1)).all()
        assert not torch.allclose(lam.sum(-1), torch.ones(B))  # independent gates, not a distribution
    else:
        torch.testing.assert_close(lam.sum(-1), torch.ones(B))
        assert (lam >= 0).all()


def test_fusion_output_shapes_and_token_weights():
    torch.manual_seed(0)
    alf = AdaptiveLayerFusion(H, NF, num_heads=4).eval()
    layers, mask = _inputs()
    out, lam, beta = alf(layers, mask)
    assert out.shape == (B, H) and lam.shape == (B, NF) and beta.shape == (B, T)
    torch.testing.assert_close(beta.sum(-1), torch.ones(B))
    assert (beta[mask == 0] == 0).all()
    # eq. 14 ends in LayerNorm_2 (default affine init): zero mean, unit variance per row
    torch.testing.assert_close(out.mean(-1), torch.zeros(B), atol=1e-5, rtol=0)


def test_fusion_is_the_lambda_weighted_sum_of_layers():
    """Eq. 8: with all layers equal to X, the fused states are (sum lambda) * X for any weights."""
    torch.manual_seed(0)
    alf = AdaptiveLayerFusion(H, NF, num_heads=2, gating=True).eval()
    x = torch.randn(1, 1, T, H).expand(1, NF, T, H).contiguous()
    mask = torch.ones(1, T, dtype=torch.long)
    captured = {}
    alf.projection.register_forward_hook(lambda m, a, o: captured.setdefault("fused", a[0]))
    _, lam, _ = alf(x, mask)
    torch.testing.assert_close(captured["fused"], lam.sum() * x[:, 0])


def test_padding_content_never_changes_the_output():
    torch.manual_seed(0)
    head = AlfiaHead(H, NF, layer_heads=4, gating=True, classifier_heads=4).eval()
    layers, mask = _inputs()
    noisy = layers.clone()
    noisy[..., :, :][(mask == 0)[:, None, :].expand(-1, NF, -1)] = 1e3
    a, lam_a, z_a = head(layers, mask)
    b, lam_b, z_b = head(noisy, mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(lam_a, lam_b)
    # and a row padded further gives the same result as the unpadded row alone
    short = head(layers[2:3, :, :2], mask[2:3, :2])
    torch.testing.assert_close(short[0], a[2:3], rtol=1e-5, atol=1e-6)


def test_attentional_classifier_head_shape_and_gradients():
    torch.manual_seed(0)
    ach = AttentionalClassifierHead(H, num_heads=4)
    z = torch.randn(5, H, requires_grad=True)
    logits = ach(z)
    assert logits.shape == (5,)
    logits.sum().backward()
    assert z.grad is not None and ach.attn.in_proj_weight.grad is not None


@pytest.mark.parametrize("arch", ["llama", "bert", "mamba", "mamba2", "xlnet", "modernbert"])
def test_alfia_model_on_every_backbone(arch):
    from ehrfm.finetune.model import FinetuneModel
    from ehrfm.pretrain.models import build_model

    small = {
        "llama": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4
        ),
        "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        "mamba": dict(hidden_size=32, num_hidden_layers=2),
        "mamba2": dict(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=32, state_size=16, chunk_size=16),
        "xlnet": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        "modernbert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    }[arch]
    torch.manual_seed(0)
    backbone = build_model(arch, "tiny", head=False, vocab_size=40, **small)
    cfg = FinetuneConfig(method="alfia")
    model = FinetuneModel(backbone, "alfia", ["a", "b"], cfg).eval()
    n_layers = small["num_hidden_layers"]
    assert model.num_fuse == min(4, n_layers + 1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, 40, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "type_ids": torch.where(mask > 0, 7, 0),
        "task": torch.tensor([0, 1, 0]),
    }
    out = model(batch)
    assert out["logits"].shape == (3,) and out["layer_weights"].shape == (3, model.num_fuse)
    assert out["embedding"].shape == (3, 32)
    # the top fused layer is the backbone's final hidden state
    captured = []
    hook = model.heads[0].alf.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model(batch)
    hook.remove()
    last = backbone(**{k: v for k, v in batch.items() if k != "task"}).last_hidden_state
    torch.testing.assert_close(captured[0][:, -1], last)
    out["logits"].sum().backward()
    assert any(p.grad is not None for p in backbone.parameters())

"""`ehrfm finetune --init random`: the from-scratch control keeps the architecture and config, not the weights."""

import torch

from ehrfm.finetune.model import load_backbone, random_backbone


def test_random_init_has_the_exported_config_and_fresh_seeded_weights(llama_export):
    pretrained = load_backbone(llama_export)
    fresh, again = random_backbone(llama_export, seed=3), random_backbone(llama_export, seed=3)
    assert type(fresh) is type(pretrained) and fresh.config.to_dict() == pretrained.config.to_dict()
    a, b, c = pretrained.state_dict(), fresh.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    weights = [k for k in a if a[k].dtype.is_floating_point and a[k].numel() > 1 and a[k].std() > 0]
    assert weights and all(not torch.equal(a[k], b[k]) for k in weights)  # nothing pretrained survives
    assert all(torch.equal(b[k], c[k]) for k in b)  # seeded

"""Objectives, schedule and configuration pieces of the pretraining engine (no training runs)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ehrfm.data_shards.schema import PAD_ID, TokenType
from ehrfm.pretrain.config import PretrainConfig
from ehrfm.pretrain.objectives import loss_sums, maskable_positions, mlm_mask, target_count


def _batch(rows=64, length=48, vocab=200):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(30, vocab, (rows, length), generator=g)
    types = torch.full((rows, length), int(TokenType.DX))
    types[:, ::7] = TokenType.REG  # special tokens sprinkled in
    types[:, 0] = TokenType.CLS
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[:, -5:] = 0  # padding
    ids[mask == 0] = PAD_ID
    types[mask == 0] = TokenType.PAD
    labels = ids.masked_fill(mask == 0, -100)
    docs = torch.ones(rows, length, dtype=torch.long)
    docs[:, 20:] = 2
    docs[mask == 0] = 0
    return {"input_ids": ids, "type_ids": types, "attention_mask": mask, "labels": labels, "document_ids": docs}


def test_mlm_mask_rules_and_determinism():
    batch = _batch(rows=512)
    out = mlm_mask(batch, probability=0.15, mask_token_id=2, vocab_size=200, first_code_id=30, seed=7)
    selected = out["labels"] != -100
    ok = maskable_positions(batch)
    assert not (selected & ~ok).any()  # never padding or special tokens
    assert (out["input_ids"][~selected] == batch["input_ids"][~selected]).all()
    assert (out["labels"][selected] == batch["input_ids"][selected]).all()
    frac = selected.sum() / ok.sum()
    assert 0.13 < frac < 0.17
    n = selected.sum()
    masked = (out["input_ids"] == 2) & selected
    changed = (out["input_ids"] != batch["input_ids"]) & selected & ~masked
    assert 0.76 < masked.sum() / n < 0.84
    assert 0.07 < changed.sum() / n < 0.13  # random replacements (a few coincide with the original id)
    assert (out["input_ids"][changed] >= 30).all()  # replacements are clinical codes
    again = mlm_mask(batch, probability=0.15, mask_token_id=2, vocab_size=200, first_code_id=30, seed=7)
    assert torch.equal(again["input_ids"], out["input_ids"])
    other = mlm_mask(batch, probability=0.15, mask_token_id=2, vocab_size=200, first_code_id=30, seed=8)
    assert not torch.equal(other["labels"], out["labels"])


def test_target_count_matches_the_models_loss_normalisation():
    """loss * target_count == summed per-target CE, so validation sums are exact over batches and ranks."""
    from ehrfm.pretrain.models.common import next_token_loss

    batch = _batch(rows=3, length=40)
    logits = torch.randn(3, 40, 200)
    loss = next_token_loss(logits, batch["labels"], batch["document_ids"])
    n = target_count(batch, causal=True)
    targets = batch["labels"][:, 1:].clone()
    targets[:, 19] = -100  # first token of document 2 is no target of document 1
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, 200), targets.reshape(-1), ignore_index=-100, reduction="sum")
    assert int(n) == int((targets != -100).sum())
    assert torch.allclose(loss * n, summed, rtol=1e-5)
    mlm = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    mlm["labels"][:, 3] = 5
    assert int(target_count(mlm, causal=False)) == 3


def test_loss_sums_match_the_models_loss_and_split_out_code_targets():
    """Validation sums: all targets reproduce the model's mean loss; the code part is the CE over the
    targets whose token is a clinical code (here: every non-REG/CLS token), computed by hand."""
    from ehrfm.pretrain.models.common import next_token_loss

    batch = _batch(rows=3, length=40)
    logits = torch.randn(3, 40, 200)
    sums = loss_sums(logits, batch, causal=True)
    assert sums.dtype == torch.float64
    mean = next_token_loss(logits, batch["labels"], batch["document_ids"])
    assert int(sums[1]) == int(target_count(batch, causal=True))
    assert float(sums[0] / sums[1]) == pytest.approx(float(mean), rel=1e-5)
    targets = batch["labels"][:, 1:].clone()
    targets[:, 19] = -100  # first token of document 2
    code = batch["type_ids"][:, 1:] == TokenType.DX
    targets[~code] = -100
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, 200), targets.reshape(-1), ignore_index=-100, reduction="sum")
    assert int(sums[3]) == int((targets != -100).sum()) and 0 < int(sums[3]) < int(sums[1])
    assert float(sums[2]) == pytest.approx(float(by_hand), rel=1e-5)
    mlm = mlm_mask(batch, probability=0.3, mask_token_id=2, vocab_size=200, first_code_id=30, seed=1)
    mlm_sums = loss_sums(logits, mlm, causal=False)  # MLM masks codes only: both halves agree
    assert int(mlm_sums[1]) == int(target_count(mlm, causal=False)) == int(mlm_sums[3])
    assert float(mlm_sums[0]) == pytest.approx(float(mlm_sums[2]))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_warmup_ten_percent(schedule):
    from ehrfm.pretrain.parallel import lr_at

    cfg = PretrainConfig()
    cfg.train.max_steps, cfg.optim.lr, cfg.optim.schedule = 100, 1e-3, schedule
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # warmup = 10 steps
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(1e-3)
    else:
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.05e-3
    if schedule == "cosine":
        assert lrs[55] == pytest.approx(0.5e-3, rel=0.05)


def test_accelerate_config_maps_strategies(tmp_path):
    from ehrfm.pretrain.accelerate_config import apply_accelerate_config

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    files = {
        "fsdp.yaml": (
            "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nmixed_precision: bf16\n"
            "num_processes: 2\nfsdp_config:\n  fsdp_version: 2\n",
            "fsdp",
        ),
        "ds.yaml": (
            f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds_json}\nnum_processes: 2\n",
            "deepspeed-zero3",
        ),
        "ds2.yaml": (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  gradient_accumulation_steps: 4\n"
            "  gradient_clipping: 0.5\n",
            "deepspeed-zero2",
        ),
        "ddp.yaml": ("distributed_type: MULTI_CPU\nnum_processes: 2\nmixed_precision: 'no'\n", "ddp"),
    }
    for name, (text, strategy) in files.items():
        (tmp_path / name).write_text(text)
        cfg = PretrainConfig()
        apply_accelerate_config(cfg, tmp_path / name)
        assert cfg.train.strategy == strategy, name
    assert cfg.train.precision == "fp32"
    cfg = PretrainConfig()
    apply_accelerate_config(cfg, tmp_path / "ds2.yaml")
    assert cfg.train.grad_accum == 4 and cfg.optim.grad_clip == 0.5
    cfg = PretrainConfig()
    apply_accelerate_config(cfg, tmp_path / "ds.yaml")
    assert cfg.deepspeed.config_file == str(ds_json)


def test_accelerate_config_fields_are_mapped_accepted_or_refused(tmp_path):
    """No field of an accelerate YAML is dropped silently: FSDP fields map or must match what ehrfm does,
    unknown fields and unsupported requests are one ConfigError naming the file and the fields."""
    from ehrfm.config import ConfigError
    from ehrfm.pretrain.accelerate_config import apply_accelerate_config

    typical = (
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nmixed_precision: bf16\nnum_machines: 2\n"
        "num_processes: 16\nmachine_rank: 0\nmain_training_function: main\nrdzv_backend: static\n"
        "same_network: true\nuse_cpu: false\ndynamo_config:\n  dynamo_backend: INDUCTOR\nfsdp_config:\n"
        "  fsdp_activation_checkpointing: true\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        "  fsdp_cpu_ram_efficient_loading: true\n  fsdp_offload_params: false\n"
        "  fsdp_reshard_after_forward: true\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n  fsdp_version: 2\n"
    )
    (tmp_path / "ok.yaml").write_text(typical)
    cfg = PretrainConfig()
    apply_accelerate_config(cfg, tmp_path / "ok.yaml")
    assert (cfg.train.strategy, cfg.train.precision, cfg.train.activation_checkpointing, cfg.train.compile) == (
        "fsdp",
        "bf16",
        True,
        True,
    )
    refused = {
        "unknown top": ("distributed_type: FSDP\nfsdp_plugin_magic: 3\n", "fsdp_plugin_magic"),
        "unknown fsdp": ("distributed_type: FSDP\nfsdp_config:\n  fsdp_new_knob: 1\n", "fsdp_new_knob"),
        "offload": ("distributed_type: FSDP\nfsdp_config:\n  fsdp_offload_params: true\n", "fsdp_offload_params=True"),
        "grad-op": (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n",
            "fsdp_sharding_strategy",
        ),
        "fp16": ("distributed_type: MULTI_GPU\nmixed_precision: fp16\n", "mixed_precision"),
        "param offload": (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  offload_param_device: cpu\n",
            "offload_param_device",
        ),
        "beside file": (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n  zero_stage: 3\n",
            "zero_stage beside deepspeed_config_file",
        ),
    }
    for name, (text, named) in refused.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            apply_accelerate_config(PretrainConfig(), path)
        assert str(path) in str(err.value) and named in str(err.value), (name, str(err.value))


def test_deepspeed_json_kept_and_autos_filled(tmp_path):
    from ehrfm.pretrain.parallel import deepspeed_config

    user = {
        "zero_optimization": {"stage": 3, "overlap_comm": False, "reduce_bucket_size": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": 0.3,
        "custom": {"keep": 1},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = PretrainConfig()
    cfg.train.strategy, cfg.deepspeed.config_file, cfg.data.batch_size = "deepspeed-zero3", str(path), 6
    merged = deepspeed_config(cfg, world_size=2, device=torch.device("cpu"))
    assert merged["gradient_clipping"] == 0.3 and merged["custom"] == {"keep": 1}  # user values win
    assert merged["zero_optimization"]["overlap_comm"] is False and merged["zero_optimization"]["stage"] == 3
    assert merged["train_micro_batch_size_per_gpu"] == 6 and merged["train_batch_size"] == 12
    user["train_micro_batch_size_per_gpu"] = 5
    path.write_text(json.dumps(user))
    with pytest.raises(ValueError, match="disagree"):
        deepspeed_config(cfg, world_size=2, device=torch.device("cpu"))


def test_cli_builds_typed_config(tmp_path):
    from ehrfm.cli import build_parser
    from ehrfm.pretrain.cli_train import build_config
    from ehrfm.pretrain.train import model_overrides

    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("optim:\n  lr: 0.001\ntrain:\n  max_steps: 7\n")
    args = build_parser().parse_args(
        [
            "pretrain",
            "--data",
            "D",
            "--model",
            "bert",
            "--size",
            "small",
            "--out",
            "R",
            "--strategy",
            "fsdp",
            "--config",
            str(yaml_file),
            "train.max_steps=9",
            "model.overrides.hidden_size=64",
            "dense.enabled=true",
        ]
    )
    cfg = build_config(args)
    assert (cfg.model.architecture, cfg.model.size, cfg.data.path, cfg.out) == ("bert", "small", "D", "R")
    assert cfg.train.strategy == "fsdp" and cfg.optim.lr == 1e-3 and cfg.train.max_steps == 9 and cfg.dense.enabled
    assert model_overrides(cfg) == {"hidden_size": 64}


def test_dense_lambda_spelling_and_overrides_between_options():
    from ehrfm.cli import parse_args
    from ehrfm.pretrain.cli_train import build_config

    # overrides may stand anywhere, also before a later option
    args = parse_args(
        [
            "pretrain",
            "--data",
            "D",
            "dense.enabled=true",
            "dense.k=4",
            "--out",
            "R",
            "dense.lambda=0.3",
            "dense.lambda_sub=0.2",
            "dense.lambda_orth=0.01",
            "dense.k=8",
        ]
    )
    dense = build_config(args).dense
    assert (dense.enabled, dense.lam, dense.lam_sub, dense.lam_orth, dense.k) == (True, 0.3, 0.2, 0.01, 8)
    assert build_config(args).out == "R"
    with pytest.raises(SystemExit):
        parse_args(["pretrain", "--data", "D", "--out", "R", "--no-such-flag"])
    with pytest.raises(SystemExit):
        parse_args(["demo", "not-an-override=1"])  # demo takes no overrides


def test_example_config_loads():
    from pathlib import Path

    from ehrfm.config import load_config
    from ehrfm.pretrain import config as config_module

    path = Path(config_module.__file__).with_name("pretrain.example.yaml")
    cfg = load_config(PretrainConfig, path, ["train.max_steps=10"])
    assert cfg.train.strategy == "fsdp" and cfg.train.max_steps == 10 and cfg.optim.warmup_fraction == 0.1


def test_size_recipes_sit_between_the_defaults_and_the_users_settings(tmp_path):
    """`ehrfm pretrain --size S` starts from S's measured recipe; a YAML, an override and a flag each win over it."""
    from ehrfm.cli import build_parser
    from ehrfm.pretrain.cli_train import build_config
    from ehrfm.pretrain.recipes import RECIPES

    def config(*argv):
        return build_config(build_parser().parse_args(["pretrain", "--data", "D", "--out", "R", *argv]))

    mini = config("--size", "mini")
    assert (mini.optim.lr, mini.data.context_length, mini.train.max_steps) == (
        RECIPES["mini"]["optim.lr"],
        RECIPES["mini"]["data.context_length"],
        RECIPES["mini"]["train.max_steps"],
    )
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: {size: mini}\noptim: {lr: 0.0001}\n")
    from_yaml = config("--config", str(yaml_file))
    assert from_yaml.optim.lr == 1e-4 and from_yaml.data.context_length == RECIPES["mini"]["data.context_length"]
    assert config("--config", str(yaml_file), "optim.lr=0.02").optim.lr == 0.02
    small = config("--size", "small")  # no measured recipe: PretrainConfig's defaults
    assert "small" not in RECIPES and small.optim.lr == PretrainConfig().optim.lr
    assert small.data.context_length == PretrainConfig().data.context_length


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA L40", 181e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A10G", 0.0),
    ],
)
def test_peak_flops_lookup_matches_whole_names(name, peak):
    """Before issue 14: "L40" matched L4's peak, H200/GH200/B200 had none."""
    from ehrfm.pretrain.metrics import peak_flops

    assert peak_flops(device_name=name) == peak
    assert peak_flops(5e12, device_name=name) == 5e12


@pytest.mark.parametrize("arch, attention", [("llama", 6.0), ("bert", 12.0), ("mamba", 0.0)])
def test_flops_per_token_counts_the_head_and_causal_attention(arch, attention):
    """6 x (matmul parameters + the H x V output projection) + the attention term: half for causal attention
    (before issue 14 the LM head was left out and causal attention counted in full)."""
    from ehrfm.pretrain.metrics import flops_per_token
    from ehrfm.pretrain.models import build_model

    sizes = {
        "llama": dict(num_attention_heads=2, intermediate_size=64),
        "bert": dict(num_attention_heads=2, intermediate_size=64),
        "mamba": dict(state_size=4),
    }[arch]
    model = build_model(arch, "tiny", head=True, vocab_size=50, hidden_size=32, num_hidden_layers=2, **sizes)
    context = 64
    body = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "embeddings" not in name
        and "embed_tokens" not in name
        and "lm_head" not in name
        and p is not model.get_output_embeddings().weight
    )
    expected = 6.0 * (body + 32 * 50) + attention * 2 * 32 * context
    assert flops_per_token(model, context) == expected

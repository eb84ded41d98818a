"""GPU rules that CPU runs do not enforce by themselves, made checkable on CPU (issue 14).

Each test here failed on the code before its fix (noted per test)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY_LLAMA = [
    "model.overrides.hidden_size=32",
    "model.overrides.num_hidden_layers=2",
    "model.overrides.num_attention_heads=2",
    "model.overrides.intermediate_size=64",
    "model.overrides.time_embedding_size=8",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_inputs_worker(rank, port, results):
    from ehrfm.pretrain.cli_train import load_pretrain_config
    from ehrfm.pretrain.parallel import DistInfo, autocast_context, build_engine
    from ehrfm.pretrain.train import build_model_for

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    try:
        cfg = load_pretrain_config(
            None, ["model.architecture=llama", "train.strategy=fsdp", "train.precision=bf16", *TINY_LLAMA]
        )
        module = build_model_for(cfg, vocab_size=40)
        device = torch.device("cpu")
        engine = build_engine(cfg, module, DistInfo(0, 1, 0, device))
        seen = {}
        # EhrEmbeddings.forward(concept_embeds, type_ids, ages, times, ...)
        module.model.ehr_embeddings.register_forward_pre_hook(
            lambda mod, args: seen.update(ages=args[2].clone(), times=args[3].clone())
        )
        g = torch.Generator().manual_seed(0)
        times = 2870.0 + torch.rand(2, 8, generator=g, dtype=torch.float64).float() * 3.0  # weeks since 1970
        ages = 60.0 + torch.rand(2, 8, generator=g) * 20.0  # years
        ids = torch.randint(5, 40, (2, 8), generator=g)
        with autocast_context(cfg, device):
            engine.model(input_ids=ids, times=times, ages=ages)
        results["times"] = (seen["times"].dtype, float((seen["times"] - times).abs().max()))
        results["ages"] = (seen["ages"].dtype, float((seen["ages"] - ages).abs().max()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp_bf16_keeps_attribute_streams_exact(spawnable):
    """FSDP2's bf16 policy must not cast the float attribute streams at the root: times ~2,870 weeks in bf16
    are multiples of 16 weeks, ages lose their decimals. Before the fix: times arrived as bf16, 7.9 weeks off."""
    results = mp.Manager().dict()
    with spawnable():
        mp.spawn(_fsdp_inputs_worker, args=(_free_port(), results), nprocs=1, join=True)
    assert results["times"] == (torch.float32, 0.0), results["times"]
    assert results["ages"] == (torch.float32, 0.0), results["ages"]


@pytest.mark.distributed
def test_deepspeed_offload_optimizer_trains(pt_data, tmp_path, run_pretrain, losses_of):
    """ZeRO-2 with the optimizer offloaded to the CPU and torch AdamW: DeepSpeed 0.19 refused it at
    initialisation (zero_force_ds_cpu_optimizer) before the fix."""
    run = tmp_path / "run"
    run_pretrain(
        pt_data,
        run,
        "llama",
        "train.max_steps=2",
        "train.val_every=0",
        "checkpoint.every=2",
        "train.save_probe=false",
        "deepspeed.offload_optimizer=true",
        strategy="deepspeed-zero2",
    )
    losses = losses_of(run)
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())


EMPTY_VAL_DRIVER = """
import sys
from ehrfm.pretrain import train as train_mod

class RankOneSeesNoValidation(train_mod.PatientStream):
    def __iter__(self):
        if self.split == "pretrain_val" and self.world_size == 2 and self.rank == 1:
            return iter(())
        return super().__iter__()

train_mod.PatientStream = RankOneSeesNoValidation
from ehrfm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.distributed
def test_rank_without_validation_batches(pt_data, tmp_path, run_pretrain):
    """A rank whose shard of the validation split is empty takes part with a stand-in batch of weight 0:
    the validation loss is rank 0's alone. Before issue 14 it crashed on ``None`` in objectives.py."""
    import json

    driver = tmp_path / "empty_val_driver.py"
    driver.write_text(EMPTY_VAL_DRIVER)
    run = tmp_path / "run"
    run_pretrain(
        pt_data,
        run,
        "llama",
        "train.max_steps=1",
        "train.val_every=1",
        "checkpoint.every=1",
        "train.save_probe=false",
        strategy="fsdp",
        nproc=2,
        driver=driver,
    )
    vals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert vals and vals[-1]["val_targets"] > 0 and vals[-1]["val_ppl"] == vals[-1]["val_ppl"]


@pytest.mark.distributed
def test_deepspeed_bf16_checkpoint_keeps_fp32_masters(pt_data, tmp_path, run_pretrain):
    """ZeRO-2 under bf16: the consolidated weights (what export reads) are the fp32 masters, not the bf16
    module copies. Before issue 14 every saved weight was bf16-representable."""
    from safetensors.torch import load_file

    from ehrfm.pretrain import checkpoint as ckpt

    run = tmp_path / "run"
    run_pretrain(
        pt_data,
        run,
        "llama",
        "train.max_steps=2",
        "train.val_every=0",
        "checkpoint.every=2",
        "train.save_probe=false",
        "train.precision=bf16",
        strategy="deepspeed-zero2",
        nproc=2,
    )
    weights = load_file(str(ckpt.latest_checkpoint(run) / "model.safetensors"))
    layer = weights["model.layers.0.self_attn.q_proj.weight"]
    assert layer.dtype == torch.float32
    assert (layer.bfloat16().float() != layer).float().mean() > 0.5  # masters carry bits bf16 cannot hold


def test_right_padded_causal_rows_need_no_mask():
    """Unpacked, right-padded rows reach SDPA without a mask (its causal kernels) and give the masked path's
    states on every real token. Before issue 14 a dense (B, 1, L, L) mask was always built."""
    from ehrfm.pretrain.models import build_model

    torch.manual_seed(0)
    model = build_model(
        "llama",
        "tiny",
        head=False,
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    ).eval()
    assert model.config._attn_implementation == "sdpa"
    lengths = torch.tensor([9, 5, 7])
    attention_mask = (torch.arange(9)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 40, (3, 9)) * attention_mask
    seen = []
    model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        masked = model(input_ids=ids, attention_mask=attention_mask, document_ids=attention_mask).last_hidden_state
    assert seen[0] is None and seen[1] is not None
    real = attention_mask.bool()
    torch.testing.assert_close(fast[real], masked[real], atol=1e-5, rtol=1e-5)
    left = attention_mask.flip(1)  # left padding keeps the mask
    with torch.no_grad():
        model(input_ids=ids.flip(1), attention_mask=left)
    assert seen[2] is not None


def test_flash_attention_is_chosen_where_it_runs(monkeypatch):
    """flash_attention_2 (varlen for packed rows) on an Ampere+ GPU with flash-attn installed, sdpa elsewhere;
    build_engine applies the choice (before issue 14 only an undocumented override reached flash)."""
    import sys
    import types

    from ehrfm import devices

    cuda = torch.device("cuda", 0)
    assert devices.preferred_attn_implementation(torch.device("cpu")) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    assert devices.preferred_attn_implementation(cuda) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert devices.preferred_attn_implementation(cuda) == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert devices.preferred_attn_implementation(cuda) == "sdpa"

    from ehrfm.pretrain import parallel

    calls = []
    monkeypatch.setattr(parallel, "use_fast_attention", lambda module, device: calls.append(device))
    from ehrfm.pretrain.cli_train import load_pretrain_config
    from ehrfm.pretrain.train import build_model_for

    cfg = load_pretrain_config(None, ["model.architecture=llama", *TINY_LLAMA])
    parallel.build_engine(cfg, build_model_for(cfg, vocab_size=40), parallel.DistInfo(0, 1, 0, torch.device("cpu")))
    assert calls == [torch.device("cpu")]

"""`ehrfm plan`: hand-computed oracles for its formulas, its JSON, the real model's parameter count, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from ehrfm.apps.plan import (
    CONSTANTS,
    ENGINE_STATE,
    PlanInputs,
    activation_bytes,
    gpu_peak,
    plan,
)
from ehrfm.cli import main as cli_main
from ehrfm.config import ConfigError
from ehrfm.pretrain.config import STRATEGIES


def test_every_engine_has_a_state_split_of_16_bytes_per_parameter():
    assert set(ENGINE_STATE) == set(STRATEGIES)
    for state in ENGINE_STATE.values():
        assert state.weights + state.grads + state.optimizer == 16


def test_state_memory_per_gpu_by_hand():
    # 1 M parameters on 4 GPUs, bytes per GPU: (weights, grads, optimizer)
    expected = {
        "ddp": (4e6, 4e6, 8e6),  # all replicated
        "fsdp": (1e6, 1e6, 2e6),  # all sharded
        "deepspeed-zero2": (2e6, 0.5e6, 3e6),  # bf16 weights replicated; grads and fp32 master + m + v sharded
        "deepspeed-zero3": (0.5e6, 0.5e6, 3e6),  # all sharded
    }
    for engine, (weights, grads, optimizer) in expected.items():
        got = ENGINE_STATE[engine].bytes_per_gpu(1_000_000, 4)
        assert got == {"weights": weights, "grads": grads, "optimizer": optimizer}, engine


def test_activation_bytes_by_hand():
    # 2 rows x 10 tokens, 3 layers of width 4, vocabulary 5: per token 34 x 4 x 3 = 408 (layers) + 6 x 5 = 30
    assert activation_bytes(2, 10, 3, 4, 5) == 20 * (408 + 30)
    # checkpointing keeps each layer's 2-byte input (2 x 4 x 3 = 24) and recomputes one layer (34 x 4 = 136)
    assert activation_bytes(2, 10, 3, 4, 5, checkpointing=True) == 20 * (24 + 136 + 30)


def test_gpu_names():
    assert gpu_peak("h100") == ("H100", 989e12)
    assert gpu_peak("H100-PCIe") == ("H100 PCIe", 756e12)
    assert gpu_peak("a100") == ("A100", 312e12)
    with pytest.raises(ConfigError, match="h200"):
        gpu_peak("tpu")


@pytest.fixture(scope="module")
def tiny_plan():
    # 100 patients x 1,000 tokens; 2 rows x 64 tokens x 4 GPUs x 2 accumulation = 1,024 slots per step
    inputs = PlanInputs(
        patients=100,
        tokens_per_patient=1000,
        gpus=4,
        architecture="llama",
        size="tiny",
        vocab_size=500,
        context_length=64,
        batch_size=2,
        grad_accum=2,
        epochs=2,
        gpu="a100",
        activation_checkpointing=False,
        mfu=0.5,
    )
    return inputs, plan(inputs)


def test_plan_by_hand(tiny_plan):
    inputs, result = tiny_plan
    r = {name: q["value"] for name, q in result["results"].items()}
    fraction = CONSTANTS["packed_real_token_fraction"].value
    assert r["token_slots_per_step"] == 1024
    assert r["real_tokens_per_step"] == pytest.approx(1024 * fraction)
    assert r["steps_per_epoch"] == math.ceil(100_000 / (1024 * fraction)) == 99
    assert r["total_steps"] == 198
    # Tiny Llama: 4 layers x 256; FLOPs per token = 6 x matmul parameters + 6 L d C (causal attention)
    assert result["model"]["layers"] == 4 and result["model"]["hidden_size"] == 256
    fpt = r["flops_per_token"]
    assert r["training_flops"] == pytest.approx(fpt * 1024 * 198)
    assert r["gpu_hours"] == pytest.approx(fpt * 1024 * 198 / (312e12 * 0.5) / 3600)
    assert r["wall_clock_hours"] == pytest.approx(r["gpu_hours"] / 4)
    assert r["prepared_shards"] == pytest.approx(100_000 * CONSTANTS["shard_bytes_per_token"].value / 1e9)
    events = 100_000 / CONSTANTS["tokens_per_event"].value
    assert r["prepare_time_fhir"] == pytest.approx(events / 13_846 / 3600)
    assert r["prepare_time_meds"] == pytest.approx(events / 194_783 / 3600)
    # ddp memory = 16 bytes per parameter + activations of 2 rows x 64 tokens
    params = r["parameters"]
    acts = 2 * 64 * (34 * 256 * 4 + 6 * 500)
    ddp = result["memory_per_gpu"]["engines"]["ddp"]
    assert ddp["total_gib"] * 2**30 == pytest.approx(16 * params + acts)
    zero3 = result["memory_per_gpu"]["engines"]["deepspeed-zero3"]
    assert zero3["total_gib"] * 2**30 == pytest.approx(16 * params / 4 + acts)


def test_plan_counts_the_real_models_parameters(tiny_plan):
    from ehrfm.pretrain.models import build_model

    _, result = tiny_plan
    model = build_model("llama", "tiny", vocab_size=500)
    assert result["results"]["parameters"]["value"] == sum(p.numel() for p in model.parameters())


def test_plan_json_marks_every_number(tiny_plan):
    _, result = tiny_plan
    assert set(result) == {"inputs", "model", "results", "memory_per_gpu", "constants"}
    assert {
        "fhir_input",
        "prepared_shards",
        "prepare_time_fhir",
        "prepare_time_meds",
        "parameters",
        "steps_per_epoch",
        "gpu_hours",
    } <= set(result["results"])
    for name, q in {**result["results"], **result["constants"]}.items():
        assert q["kind"] in ("measured", "assumed"), name
        assert q.get("basis") or q.get("source"), name
    # a result resting on an assumed constant is assumed
    assert result["results"]["gpu_hours"]["kind"] == "assumed"
    assert result["results"]["prepared_shards"]["kind"] == "measured"
    assert result["memory_per_gpu"]["kind"] == "assumed"
    assert set(result["memory_per_gpu"]["engines"]) == set(STRATEGIES)
    json.dumps(result)  # JSON-able as it stands


def test_plan_cli(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--patients", "1000", "--tokens-per-patient", "2500", "--model", "llama", "--size", "mini"]
    argv += ["--gpus", "8", "--engine", "ddp", "fsdp", "--gpu", "h200", "--json-out", str(out)]
    assert cli_main([*argv, "train.activation_checkpointing=true"]) == 0
    text = capsys.readouterr().out
    assert "gpu_hours" in text and "memory per GPU" in text and "H200" in text
    result = json.loads(out.read_text())
    assert result["inputs"]["activation_checkpointing"] is True
    assert result["inputs"]["context_length"] == 256  # Mini's recipe, as `ehrfm pretrain` resolves it
    assert set(result["memory_per_gpu"]["engines"]) == {"ddp", "fsdp"}
    assert cli_main(["plan", "--patients", "10", "--tokens-per-patient", "10", "--gpus", "1", "--gpu", "tpu"]) == 2
    assert "error: --gpu 'tpu'" in capsys.readouterr().err

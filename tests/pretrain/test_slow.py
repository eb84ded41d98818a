"""Longer end-to-end checks (``-m slow``): multi-rank resume bit-identity and resharding 1 -> 2 ranks."""

from __future__ import annotations

import pytest

from ehrfm.pretrain import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_fsdp_two_rank_resume_is_bit_identical(pt_data, tmp_path, run_pretrain, losses_of):
    args = [
        "train.max_steps=4",
        "checkpoint.every=2",
        "train.val_every=0",
        "train.save_probe=false",
        "model.overrides.embedding_dropout=0.1",
    ]
    straight, crashed = tmp_path / "a", tmp_path / "b"
    run_pretrain(pt_data, straight, "llama", *args, strategy="fsdp", nproc=2)
    run_pretrain(pt_data, crashed, "llama", *args, strategy="fsdp", nproc=2, expect=None, crash_after=3)
    assert ckpt.read_state(ckpt.latest_checkpoint(crashed)).step == 2
    run_pretrain(pt_data, crashed, "llama", *args, strategy="fsdp", nproc=2)
    assert losses_of(straight) == losses_of(crashed)


def test_reshard_one_rank_to_two(pt_data, tmp_path, run_pretrain, losses_of, engine_info):
    run = tmp_path / "run"
    args = ["checkpoint.every=2", "train.val_every=0", "train.save_probe=false"]
    run_pretrain(pt_data, run, "llama", "train.max_steps=2", *args, strategy="ddp", nproc=1)
    run_pretrain(pt_data, run, "llama", "train.max_steps=4", *args, strategy="fsdp", nproc=2)
    assert engine_info(run)["world_size"] == 2
    assert sorted(losses_of(run)) == [1, 2, 3, 4]
    state = ckpt.read_state(ckpt.latest_checkpoint(run))
    assert state.step == 4 and state.world_size == 2 and len(state.ranks) == 2


def test_deepspeed_refuses_world_size_change(pt_data, tmp_path, run_pretrain):
    run = tmp_path / "run"
    args = ["checkpoint.every=2", "train.val_every=0", "train.save_probe=false"]
    run_pretrain(pt_data, run, "llama", "train.max_steps=2", *args, strategy="deepspeed-zero2", nproc=2)
    proc = run_pretrain(
        pt_data, run, "llama", "train.max_steps=4", *args, strategy="deepspeed-zero2", nproc=1, expect=None
    )
    assert proc.returncode != 0 and "resharding the ZeRO optimizer state" in proc.stderr


def test_compiled_blocks_match_eager(pt_data, tmp_path, run_pretrain, losses_of):
    args = ["train.max_steps=3", "train.val_every=0", "checkpoint.every=0", "train.save_probe=false"]
    run_pretrain(pt_data, tmp_path / "eager", "llama", *args)
    run_pretrain(pt_data, tmp_path / "compiled", "llama", *args, "train.compile=true")
    eager, compiled = losses_of(tmp_path / "eager"), losses_of(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    assert all(abs(eager[s] - compiled[s]) <= 1e-5 for s in eager)

"""Pretraining fixtures: a small prepared MEDS corpus, tiny model overrides, a CLI runner (one process or
torchrun with 2 gloo ranks on a free port) and a single-process reference of a 2-rank step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ehrfm.callbacks import FAULT_CRASH_ENV

TINY = {
    "llama": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "mamba": {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4},
    "mamba2": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_heads": 4,
        "head_dim": 16,
        "state_size": 8,
        "chunk_size": 16,
    },
    "bert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "xlnet": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "modernbert": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64},
}
COMMON = [
    "data.context_length=32",
    "data.batch_size=4",
    "data.pack_window=16",
    "train.progress_bar=false",
    "model.overrides.embedding_dropout=0.0",
    "model.overrides.time_embedding_size=8",
]


def tiny_overrides(arch: str) -> list[str]:
    return COMMON + [f"model.overrides.{k}={v}" for k, v in TINY[arch].items()]


@pytest.fixture(scope="session")
def pt_data(tmp_path_factory) -> Path:
    """meds-testing-helpers, 60 subjects: 31 pretrain / 3 pretrain_val patients, vocabulary of 45 tokens."""
    from ehrfm.data_shards.config import PrepareConfig
    from ehrfm.data_shards.prepare import prepare

    root = tmp_path_factory.mktemp("pt")
    exe = Path(sys.executable).with_name("build_sample_MEDS_dataset")
    subprocess.run(
        [str(exe), f"output_dir={root / 'meds'}", "N_subjects=60", "seed=1"], check=True, capture_output=True
    )
    cfg = PrepareConfig(format="meds", tasks=[])
    cfg.splits.respect_meds_splits = False
    prepare(root / "meds", root / "data", cfg, progress=False)
    return root / "data"


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(data, out, arch, *overrides, strategy="ddp", nproc=1, driver=None) -> list[str]:
    target = [str(driver)] if driver else ["-m", "ehrfm.cli"]
    args = [
        "pretrain",
        "--data",
        str(data),
        "--model",
        arch,
        "--size",
        "tiny",
        "--out",
        str(out),
        "--strategy",
        strategy,
        *tiny_overrides(arch),
        *overrides,
    ]
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            *target,
            *args,
        ]
    return [sys.executable, *target, *args]


@pytest.fixture
def pretrain_popen():
    """Start a one-process `ehrfm pretrain` without waiting (signal tests)."""
    return lambda data, out, arch, *overrides: subprocess.Popen(
        command(data, out, arch, *overrides), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture
def run_pretrain():
    """run_pretrain(data, out, arch, *overrides, strategy="ddp", nproc=1, expect=0, driver=None, crash_after=0)
    -> CompletedProcess.

    nproc > 1 launches torchrun (gloo, 127.0.0.1, a free port). ``driver`` replaces ``-m ehrfm.cli`` with a
    script path (fault-injection drivers); ``crash_after`` > 0 makes every rank die (exit 137, no checkpoint)
    after that step (``ehrfm.callbacks.CrashAfterStep`` through its environment variable)."""

    def run(data, out, arch, *overrides, strategy="ddp", nproc=1, expect=0, driver=None, crash_after=0, timeout=400):
        cmd = command(data, out, arch, *overrides, strategy=strategy, nproc=nproc, driver=driver)
        env = _env()
        if crash_after:
            env[FAULT_CRASH_ENV] = str(crash_after)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(Path(out).parent))
        if expect is not None and proc.returncode != expect:
            raise AssertionError(
                f"exit {proc.returncode} != {expect}\n{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        return proc

    return run


def train_losses(run_dir: Path) -> dict[int, float]:
    from ehrfm.metrics_log import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("split") != "val"}


@pytest.fixture
def losses_of():
    return train_losses


@pytest.fixture
def engine_info():
    return lambda run_dir: json.loads((Path(run_dir) / "engine.json").read_text())


@pytest.fixture
def reference_losses():
    """Losses of ``steps`` optimizer steps computed in this process the way ``world_size`` ranks would: each
    simulated rank reads its own shard of the stream, gradients are averaged, one AdamW step on one model."""

    def run(data, arch, steps, *overrides, world_size=2):
        """Micro-batches: rank r's stream yields them in order; loss / (world_size * grad_accum) per backward."""
        import torch

        from ehrfm.data_shards.shards import read_manifest
        from ehrfm.data_shards.stream import EhrDataLoader, PatientStream
        from ehrfm.pretrain.cli_train import load_pretrain_config
        from ehrfm.pretrain.objectives import Objective
        from ehrfm.pretrain.parallel import lr_at, param_groups
        from ehrfm.pretrain.train import build_model_for, first_code_id, stream_config

        # resolved as `ehrfm pretrain` does: the size's recipe sits below the overrides
        cfg = load_pretrain_config(
            None,
            [
                f"model.architecture={arch}",
                f"data.path={data}",
                f"train.max_steps={steps}",
                *tiny_overrides(arch),
                *overrides,
            ],
        )
        model = build_model_for(cfg, read_manifest(data)["vocab_size"])
        o = cfg.optim
        opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        ranks = []
        for r in range(world_size):
            loader = EhrDataLoader(
                PatientStream(data, "pretrain", stream_config(cfg, True), rank=r, world_size=world_size)
            )
            objective = Objective(arch, model, seed=cfg.train.seed, rank=r, first_code_id=first_code_id(data))
            ranks.append((iter(loader), objective))
        out = []
        accum = cfg.train.grad_accum
        for step in range(steps):
            total = 0.0
            for it, objective in ranks:
                for micro in range(accum):
                    batch = objective.prepare(next(it), step, micro, torch.device("cpu"))
                    loss, _ = objective(model, batch)
                    (loss / (world_size * accum)).backward()
                    total += float(loss.detach()) / (world_size * accum)
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.step()
            opt.zero_grad()
            out.append(total)
        return out

    return run


REMOTE_SCRIPT = r"""
import importlib.abc, json, sys

class BlockEhrfm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ehrfm" or name.startswith("ehrfm."):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockEhrfm())
import torch
import transformers
from safetensors.torch import load_file

hf, probe_path, auto_name = sys.argv[1:4]
model = getattr(transformers, auto_name).from_pretrained(hf, trust_remote_code=True).eval()
base = transformers.AutoModel.from_pretrained(hf, trust_remote_code=True)
probe = load_file(probe_path)
batch = {k[len("batch."):]: v for k, v in probe.items() if k.startswith("batch.")}
with torch.no_grad():
    diff = float((model(**batch).logits - probe["logits"]).abs().max())
print(json.dumps({"diff": diff, "module": type(model).__module__, "base": type(base).__name__,
                  "ehrfm_imported": any(k == "ehrfm" or k.startswith("ehrfm.") for k in sys.modules)}))
"""


@pytest.fixture
def remote_check(tmp_path):
    """Load an export with trust_remote_code=True in a subprocess that cannot import ehrfm; returns its report."""

    def check(hf_dir, probe, auto_name):
        script = tmp_path / "remote_check.py"
        script.write_text(REMOTE_SCRIPT)
        env = _env()
        env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
        proc = subprocess.run(
            [sys.executable, str(script), str(hf_dir), str(probe), auto_name],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=str(tmp_path),
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return check

"""Sharded, atomic, resumable checkpoints.

Layout of a run folder::

    RUN/checkpoints/step_00000100/     one complete checkpoint
        .metadata, __*_*.distcp        DCP shards of {"model", "optim"} (ddp / fsdp; resume + resharding), or
        deepspeed/                     DeepSpeed's own ZeRO files (deepspeed-*; resume, same world size)
        model.safetensors              the consolidated weights (every strategy; what export reads)
        trainer_state.json             step, schedule, early-stopping state, every rank's RNG + loader state
        config.yaml, model_config.json resolved run config and the HF model config
        COMPLETE                       written last, before the rename
    RUN/checkpoints/latest             name of the newest complete checkpoint (moved after COMPLETE exists)
    RUN/checkpoints/best               name of the best-validation checkpoint

A checkpoint is written into ``.tmp-step_N``, completed with the ``COMPLETE`` marker, renamed, and only then
does ``latest`` move; discovery ignores anything without the marker, so a write killed at any point is never
resumed from. DCP checkpoints reshard on load (any world size, ddp <-> fsdp); DeepSpeed ones resume only
with the same world size and ZeRO stage (a clear error names what cannot be resharded).

Our own files are JSON (state) and safetensors (weights); export reads only those. Resuming lets DCP and
DeepSpeed read their own files (DCP's ``.metadata`` and DeepSpeed's ZeRO states are pickles written by this
run): resume only from run folders you trust.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..logging import get_logger

log = get_logger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
STATE_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed in this setting; the message says what and why."""


@dataclasses.dataclass
class TrainerState:
    """Everything besides weights and optimizer moments that a resume needs (mirrored by tests)."""

    step: int = 0  # optimizer steps done
    micro_steps: int = 0
    tokens_seen: int = 0  # real (non-pad) tokens over all ranks
    best_val_loss: float = float("inf")
    best_step: int = -1
    bad_evals: int = 0  # validations since the last improvement (early stopping)
    stopped_early: bool = False
    strategy: str = ""
    world_size: int = 1
    schedule: dict = dataclasses.field(default_factory=dict)  # lr schedule parameters (stateless in step)
    val_history: list = dataclasses.field(default_factory=list)  # [{"step", "val_loss", "val_ppl"}]
    ranks: list = dataclasses.field(default_factory=list)  # per rank: {"rank", "rng", "loader"}


# -- RNG ------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA) as JSON-able values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


# -- discovery ------------------------------------------------------------------------------------------
def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file() and not Path(path).name.startswith(".tmp")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points to if complete, else the newest complete one, else None."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if is_complete(target):
            return target
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """A complete checkpoint (``step`` or the latest); raises CheckpointError naming what exists."""
    if step is None:
        path = latest_checkpoint(run_dir)
    else:
        path = checkpoint_root(run_dir) / step_name(step)
        path = path if is_complete(path) else None
    if path is None:
        have = [p.name for p in complete_checkpoints(run_dir)]
        raise CheckpointError(f"{run_dir}: no complete checkpoint{'' if step is None else f' for step {step}'}; have {have}")
    return path


def read_state(path: Path) -> TrainerState:
    data = json.loads((Path(path) / STATE_FILE).read_text())
    if data.pop("version", None) != STATE_VERSION:
        raise CheckpointError(f"{path}: trainer state version differs from {STATE_VERSION}")
    return TrainerState(**data)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- save -----------------------------------------------------------------------------------------------
def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(
    run_dir: Path,
    engine,
    state: TrainerState,
    *,
    loader_state: dict,
    config_yaml: str,
    keep: int,
    best: bool = False,
) -> Path:
    """Collective: every rank calls it. Writes the checkpoint of ``state.step`` atomically and prunes to the
    last ``keep`` (the best is kept too). Returns the final path."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(run_dir)
    final = root / step_name(state.step)
    tmp = root / f".tmp-{step_name(state.step)}"
    per_rank = {"rank": rank, "rng": rng_state(), "loader": loader_state}
    ranks = _gather(per_rank)
    if is_complete(final):  # e.g. best and periodic at the same step
        if rank == 0:
            _set_pointers(root, final, best)
        _barrier()
        return final
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    _save_weights(engine, tmp)
    _barrier()
    if rank == 0:
        state = dataclasses.replace(state, ranks=sorted(ranks, key=lambda r: r["rank"]))
        _write_text(tmp / STATE_FILE, json.dumps({"version": STATE_VERSION, **dataclasses.asdict(state)}))
        _write_text(tmp / "config.yaml", config_yaml)
        _write_text(tmp / "model_config.json", engine.module.config.to_json_string())
        _write_text(tmp / MARKER, "")
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
        _set_pointers(root, final, best)
        _prune(root, keep)
    _barrier()
    log.info("checkpoint %s written", final)
    return final


def _set_pointers(root: Path, final: Path, best: bool) -> None:
    # `latest` moves only forward: a best checkpoint re-pointed later never moves it back
    current = latest_checkpoint(root.parent)
    if current is None or current.name <= final.name:
        _write_text(root / "latest", final.name)
    if best:
        _write_text(root / "best", final.name)


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    protected = set()
    for name in ("latest", "best"):
        if (root / name).is_file():
            protected.add((root / name).read_text().strip())
    done = complete_checkpoints(root.parent)
    for path in done[:-keep]:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # leftovers of killed writes
        shutil.rmtree(stale, ignore_errors=True)


def _save_weights(engine, path: Path) -> None:
    if engine.kind == "deepspeed":
        _save_deepspeed(engine, path)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    # The consolidated weights as well (EHR backbones are <= ~30M parameters): export then reads safetensors
    # only, never DCP's pickled .metadata.
    full = get_model_state_dict(engine.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    _save_consolidated(full, path)


def _save_deepspeed(engine, path: Path) -> None:
    ds = engine.model
    ds.save_checkpoint(str(path / "deepspeed"), tag="zero", save_latest=False)
    if ds.zero_optimization_partition_weights():
        full = ds._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0 only
    else:
        full = engine.module.state_dict() if dist.get_rank() == 0 else None
    _save_consolidated(full, path)


def _save_consolidated(full: dict[str, torch.Tensor] | None, path: Path) -> None:
    """Rank 0 writes the full weights (``full``; None on other ranks) as ``path/model.safetensors``."""
    from safetensors.torch import save_file

    if dist.get_rank() == 0:
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in full.items()}, str(path / "model.safetensors"))


# -- load -----------------------------------------------------------------------------------------------
def load_checkpoint(path: Path, engine) -> TrainerState:
    """Collective: restore weights + optimizer into ``engine`` and this rank's RNG; return the trainer state
    (its ``ranks`` list carries every rank's loader state for the caller to load or reshard)."""
    state = read_state(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_ds = (Path(path) / "deepspeed").is_dir()
    if saved_ds or engine.kind == "deepspeed":
        if not (saved_ds and engine.kind == "deepspeed"):
            raise CheckpointError(
                f"{path} was written by strategy {state.strategy!r}; it cannot be resumed with {engine.cfg.train.strategy!r}: "
                "DeepSpeed ZeRO partitions and DCP shards do not convert into each other (export the weights and start a "
                "new run from them instead)"
            )
        if state.world_size != world or state.strategy != engine.cfg.train.strategy:
            raise CheckpointError(
                f"{path}: DeepSpeed optimizer partitions were written by {state.world_size} ranks with {state.strategy}; "
                f"resuming with {world} ranks / {engine.cfg.train.strategy} would need resharding the ZeRO optimizer state, "
                "which is supported only for ddp/fsdp (DCP) checkpoints; resume with the original world size"
            )
        engine.model.load_checkpoint(str(Path(path) / "deepspeed"), tag="zero")
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(engine.model, engine.optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(engine.model, engine.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    if state.world_size == world:
        set_rng_state(state.ranks[rank]["rng"])
    return state


def load_consolidated_weights(path: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model weights of a checkpoint on CPU, from its safetensors file (no pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: no model.safetensors (written by an older ehrfm?)")
    return load_file(str(path / "model.safetensors"))

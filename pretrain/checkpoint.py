"""Sharded, atomic, resumable checkpoints.

Layout of a run folder::

    RUN/checkpoints/step_00000100/     one complete checkpoint
        .metadata, __*_*.distcp        DCP shards of {"model", "optim"} (ddp / fsdp; resume + resharding), or
        deepspeed/                     DeepSpeed's own ZeRO files (deepspeed-*; resume, same world size)
        model.safetensors              the consolidated weights (every strategy; what export reads)
        trainer_state.json             step, schedule, early-stopping state, every rank's RNG + loader state
        config.yaml, model_config.json resolved run config and the HF model config
        checkpoint_manifest.json       size + sha256 of every file above (integrity, verified before any load)
        COMPLETE                       written last, before the rename
    RUN/checkpoints/latest             name of the newest complete checkpoint (moved after COMPLETE exists)
    RUN/checkpoints/best               name of the best-validation checkpoint

A checkpoint is written into ``.tmp-step_N``, completed with the ``COMPLETE`` marker, renamed, and only then
does ``latest`` move; discovery ignores anything without the marker, so a write killed at any point is never
resumed from. DCP checkpoints reshard on load (any world size, ddp <-> fsdp); DeepSpeed ones resume only
with the same world size and ZeRO stage (a clear error names what cannot be resharded).

Our own files are JSON (state) and safetensors (weights); export reads only those. Resuming lets DCP and
DeepSpeed read their own files, and DCP's ``.metadata`` and DeepSpeed's ZeRO states are pickles.

Trust model. A checkpoint is loaded (resume or export) only after :func:`verify_checkpoint` has checked every
file against ``checkpoint_manifest.json``, written at save time inside the atomic rename: a missing, extra,
truncated or modified file (a planted pickle, a disk error) fails the check, naming the file. On resume a
checkpoint that fails is moved aside to ``checkpoints/corrupt-step_N`` (nothing is deleted) and the previous
intact one is used, with a warning; if none is intact the run stops with :class:`CheckpointError`. The
manifest protects against corruption and accidents, not against someone who can rewrite the run folder (they
could rewrite the manifest too): run folders are trusted only if their manifest verifies, and you should
never resume from, or export, a run folder you did not write.

Every checkpoint also records the identity of the data it was trained on (:func:`data_identity`: vocabulary
fingerprint and size, the shard list with checksums, the manifest's hash); a resume or export against a data
folder that differs is refused, naming what changed.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import EhrfmError
from ..logging import get_logger
from ..loop import LoopState
from ..outputs import file_sha256, write_text_atomic

log = get_logger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checkpoint_manifest.json"
STATE_VERSION = 3  # 2: data identity in the state, integrity manifest beside it; 3: LoopState fields
READABLE_STATE_VERSIONS = (2, 3)  # 2 is read by renaming best_val_loss to best_score (inf: None)
QUARANTINE_PREFIX = "corrupt-"


class CheckpointError(EhrfmError, RuntimeError):
    """A checkpoint that cannot be resumed in this setting; the message says what and why."""


@dataclasses.dataclass
class TrainerState(LoopState):
    """Everything besides weights and optimizer moments that a resume needs (mirrored by tests): the loop's
    progress (:class:`ehrfm.loop.LoopState`; ``best_score`` is the best validation loss) and the rest below."""

    micro_steps: int = 0
    tokens_seen: int = 0  # real (non-pad) tokens over all ranks
    strategy: str = ""
    world_size: int = 1
    schedule: dict = dataclasses.field(default_factory=dict)  # lr schedule parameters (stateless in step)
    data: dict = dataclasses.field(default_factory=dict)  # data_identity() of the training data folder
    ranks: list = dataclasses.field(default_factory=list)  # per rank: {"rank", "rng", "loader"}


# -- RNG ------------------------------------------------------------------------------------------------
def state_to_text(t: torch.Tensor) -> str:
    """A generator / RNG state (uint8 tensor) as base64 text for JSON."""
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def state_from_text(s: str) -> torch.Tensor:
    """The uint8 state tensor of :func:`state_to_text`'s text."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA) as JSON-able values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": state_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = state_to_text(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state_from_text(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state_from_text(state["cuda"]))


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
        raise CheckpointError(
            f"{run_dir}: no complete checkpoint{'' if step is None else f' for step {step}'}; have {have}"
        )
    return path


def read_state(path: Path) -> TrainerState:
    file = Path(path) / STATE_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable trainer state ({err})") from None
    version = data.pop("version", None)
    if version not in READABLE_STATE_VERSIONS:
        raise CheckpointError(
            f"{file}: trainer state version {version} is not one of {READABLE_STATE_VERSIONS} (written by "
            "another ehrfm version); start a new run, or export it with the ehrfm version that wrote it"
        )
    if version == 2:
        best = data.pop("best_val_loss", None)
        data["best_score"] = None if best is None or math.isinf(best) else best
    return TrainerState(**data)


# -- integrity --------------------------------------------------------------------------------------------
def _checkpoint_files(path: Path) -> list[str]:
    """Relative paths of every file of a checkpoint folder except the manifest and the marker."""
    return sorted(
        str(f.relative_to(path))
        for f in Path(path).rglob("*")
        if (f.is_file() or f.is_symlink()) and f.name not in (MANIFEST_FILE, MARKER)
    )


def write_integrity_manifest(path: Path) -> None:
    """Record size and sha256 of every file of the (temp) checkpoint folder ``path``."""
    files = {}
    for rel in _checkpoint_files(path):
        file = Path(path) / rel
        if file.is_symlink():
            raise CheckpointError(f"{file}: checkpoints may not contain symbolic links")
        files[rel] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    _write_text(Path(path) / MANIFEST_FILE, json.dumps({"version": 1, "algorithm": "sha256", "files": files}, indent=1))


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``path`` that is missing, unexpected, of another
    size or another sha256 than ``checkpoint_manifest.json`` records (see the module docstring)."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{manifest_path}: missing: the checkpoint has no integrity manifest (written by an older "
            "ehrfm, or not by ehrfm); refusing to load it"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{manifest_path}: unreadable integrity manifest ({err}); refusing to load the checkpoint"
        ) from None
    present = _checkpoint_files(path)
    unexpected = sorted(set(present) - set(files))
    if unexpected:
        raise CheckpointError(
            f"{path / unexpected[0]}: file not recorded in {MANIFEST_FILE} (planted or left by another "
            "program); refusing to load the checkpoint"
        )
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file() or file.is_symlink():
            raise CheckpointError(f"{file}: missing from the checkpoint (recorded in {MANIFEST_FILE})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{file}: {size} bytes, {expected['bytes']} recorded at save time (truncated or modified)"
            )
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from the one recorded at save time (corrupted or modified)")


def quarantine(path: Path) -> Path:
    """Move a checkpoint that failed verification out of discovery (``corrupt-step_N``); nothing is deleted."""
    path = Path(path)
    target = path.with_name(QUARANTINE_PREFIX + path.name)
    n = 1
    while target.exists():
        target = path.with_name(f"{QUARANTINE_PREFIX}{path.name}.{n}")
        n += 1
    os.rename(path, target)
    return target


def _newest_first(run_dir: Path) -> list[Path]:
    latest = latest_checkpoint(run_dir)
    found = complete_checkpoints(run_dir)[::-1]
    if latest is not None and latest in found:  # `latest` first, then the rest by step
        found.remove(latest)
        found.insert(0, latest)
    return found


def select_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies; those that fail on the way are quarantined with a
    warning. None when the run has no checkpoint; :class:`CheckpointError` when none verifies. Rank 0 only."""
    failures = []
    for path in _newest_first(run_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            moved = quarantine(path)
            failures.append(str(err))
            log.warning("%s; moved aside to %s, falling back to the previous checkpoint", err, moved.name)
            continue
        return path
    if failures:
        raise CheckpointError(
            f"{run_dir}: no checkpoint passes its integrity check ({'; '.join(failures)}); the failing "
            f"ones were moved to {QUARANTINE_PREFIX}step_*. Start a new run with another --out"
        )
    return None


def agree_on_resume_checkpoint(run_dir: Path) -> Path | None:
    """Collective: rank 0 selects (:func:`select_resume_checkpoint`), every rank gets its answer or its error."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    answer: list = [None, None]
    if rank == 0:
        try:
            path = select_resume_checkpoint(run_dir)
            answer = [None if path is None else str(path), None]
        except CheckpointError as err:
            answer = [None, str(err)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise CheckpointError(answer[1])
    return None if answer[0] is None else Path(answer[0])


# -- data identity ----------------------------------------------------------------------------------------
VOLATILE_MANIFEST_KEYS = ("seconds",)  # differ between byte-identical re-runs of prepare


def data_identity(data_dir: Path, manifest: dict) -> dict:
    """What makes a prepared data folder the same for training: vocabulary fingerprint and size, the shard
    list with checksums (one sha256), and a hash of the manifest without its timing and source path."""
    shards = sorted((s["path"], s.get("sha256", "")) for split in manifest.get("shards", {}).values() for s in split)
    stable = {k: v for k, v in manifest.items() if k not in VOLATILE_MANIFEST_KEYS}
    stable["source"] = {k: v for k, v in (manifest.get("source") or {}).items() if k != "path"}
    return {
        "path": str(Path(data_dir).resolve()),
        "vocab_fingerprint": manifest.get("vocab_fingerprint"),
        "vocab_size": manifest.get("vocab_size"),
        "shards_sha256": hashlib.sha256(json.dumps(shards).encode()).hexdigest(),
        "shards": len(shards),
        "manifest_sha256": hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest(),
    }


IDENTITY_KEYS = ("vocab_fingerprint", "vocab_size", "shards_sha256")  # must match; the rest only warn


def check_data_identity(path: Path, state: TrainerState, current: dict) -> None:
    """Refuse (CheckpointError naming what changed) a checkpoint trained on other data than ``current``."""
    saved = state.data or {}
    changed = [
        f"{key} {saved.get(key)!r} -> {current.get(key)!r}"
        for key in IDENTITY_KEYS
        if saved.get(key) != current.get(key)
    ]
    if changed:
        raise CheckpointError(
            f"{path} was trained on data folder {saved.get('path')} and the data folder {current.get('path')} differs: "
            f"{'; '.join(changed)}. Use the data folder the run was trained on (or re-prepare it identically), or start "
            "a new run with another --out"
        )
    if saved.get("manifest_sha256") != current.get("manifest_sha256"):
        log.warning("%s: the data folder's manifest changed since training (same vocabulary and shards)", path)


def _write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text, fsync=True)


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


def barrier() -> None:
    """dist.barrier() when several ranks run; a no-op for one process."""
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
        barrier()
        return final
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    _save_weights(engine, tmp)
    barrier()
    if rank == 0:
        state = dataclasses.replace(state, ranks=sorted(ranks, key=lambda r: r["rank"]))
        _write_text(tmp / STATE_FILE, json.dumps({"version": STATE_VERSION, **dataclasses.asdict(state)}))
        _write_text(tmp / "config.yaml", config_yaml)
        _write_text(tmp / "model_config.json", engine.module.config.to_json_string())
        write_integrity_manifest(tmp)
        _write_text(tmp / MARKER, "")
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
        _set_pointers(root, final, best)
        _prune(root, keep)
    barrier()
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
    if ds.bfloat16_enabled() or ds.fp16_enabled():
        full = _deepspeed_fp32_masters(engine)
    elif ds.zero_optimization_partition_weights():
        full = ds._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0 only
    else:
        full = engine.module.state_dict() if dist.get_rank() == 0 else None
    _save_consolidated(full, path)


def _deepspeed_fp32_masters(engine) -> dict[str, torch.Tensor] | None:
    """Collective: the full fp32 master weights of a bf16/fp16 DeepSpeed run (ZeRO-2 or 3) on rank 0, None
    elsewhere. The module's own weights are the 16-bit copies; exports and resharding need the masters.
    Buffers and tied names come from the module's state dict."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    rank0 = dist.get_rank() == 0
    masters: dict[int, torch.Tensor] = {}
    for _, param in module.named_parameters():  # unique parameters, the same order on every rank
        value = safe_get_full_fp32_param(param)  # collective
        if value is None:
            raise CheckpointError("DeepSpeed returned no fp32 master for a parameter; cannot write fp32 weights")
        if rank0:
            masters[id(param)] = value.detach().float().cpu()
    if not rank0:
        return None
    by_name = dict(module.named_parameters(remove_duplicate=False))
    full = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        param = by_name.get(key)
        full[key] = masters[id(param)] if param is not None else tensor.detach().cpu()
    return full


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

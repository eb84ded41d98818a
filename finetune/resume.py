"""Resuming an interrupted `ehrfm finetune`: an epoch checkpoint beside the output folder.

After every epoch (validation done, best weights kept) :class:`EpochCheckpoint` writes ``<out>.resume/``:

    weights-<epoch>.safetensors   model.* (current weights), best.* (the best epoch's), optim.<param>.<name>
    state.json                    fingerprint, loop state, RNG states, the shuffle generator, optimizer groups

``state.json`` is written last and names its weights file, so a checkpoint is complete exactly when
``state.json`` is readable. Running the same command again resumes at the next epoch; the resumed run then
equals an uninterrupted one (same weights, history and best epoch on CPU). A checkpoint of other settings (a
different fingerprint: config, model or data) is discarded with a warning and training starts over. The
folder carries an ehrfm owner file and is removed once the finetuned model is saved; ehrfm never removes a
``.resume`` folder it did not write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from ehrfm.callbacks import KeepBestWeights
from ehrfm.loop import Callback, Loop, LoopState
from ehrfm.outputs import claim_run_dir, read_owner, write_json_atomic

log = logging.getLogger("ehrfm.finetune")

RESUME_COMMAND = "finetune-resume"
STATE_FILE = "state.json"


def resume_folder(out: Path) -> Path:
    return Path(out).with_name(f"{Path(out).name}.resume")


def run_fingerprint(cfg, model_dir: Path, data_dir: Path, export_meta: dict) -> str:
    """What a checkpoint must match to be resumed: the finetuning config and the resolved inputs."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "progress_bar")}
    text = json.dumps(
        {
            "config": settings,
            "model": str(Path(model_dir).resolve()),
            "data": str(Path(data_dir).resolve()),
            "vocab": export_meta.get("vocab_fingerprint"),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class EpochCheckpoint(Callback):
    """Writes the epoch checkpoint after each epoch; :meth:`restore` loads one, :meth:`finish` removes it."""

    def __init__(
        self,
        folder: Path,
        fingerprint: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        best: KeepBestWeights,
        inputs: list,
    ) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.model, self.optimizer, self.generator, self.best = model, optimizer, generator, best
        self.inputs = inputs

    # -- writing --------------------------------------------------------------------------------------------
    def on_epoch_end(self, loop: Loop) -> None:
        from safetensors.torch import save_file

        from ehrfm.pretrain.checkpoint import rng_state, state_to_text

        claim_run_dir(self.folder, RESUME_COMMAND, inputs=self.inputs)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in (self.best.best or {}).items()})
        optim = self.optimizer.state_dict()
        for index, entries in optim["state"].items():
            tensors.update({f"optim.{index}.{name}": value for name, value in entries.items()})
        weights = f"weights-{loop.state.epoch:04d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(self.folder / weights))
        state = {
            "fingerprint": self.fingerprint,
            "weights": weights,
            "loop": {**dataclasses.asdict(loop.state), "epoch": loop.state.epoch + 1},  # resume at the next one
            "rng": rng_state(),
            "shuffle": state_to_text(self.generator.get_state()),
            "optim_groups": optim["param_groups"],
            "has_best": self.best.best is not None,
        }
        write_json_atomic(self.folder / STATE_FILE, state)
        for old in self.folder.glob("weights-*.safetensors"):
            if old.name != weights:
                old.unlink()

    # -- reading --------------------------------------------------------------------------------------------
    def restore(self, state: LoopState) -> bool:
        """Load a matching checkpoint into the model, optimizer, generators, best weights and ``state``; True
        when one was loaded. A checkpoint of other settings is removed (it is ehrfm's) and False returned; a
        folder of that name that ehrfm did not write raises ``OutputDirError`` (nothing is touched)."""
        from safetensors.torch import load_file

        from ehrfm.outputs import check_output_dir
        from ehrfm.pretrain.checkpoint import set_rng_state, state_from_text

        # a folder of that name that ehrfm did not write stops the run now, not after the first epoch
        check_output_dir(self.folder, RESUME_COMMAND, inputs=self.inputs, has_overwrite_flag=False)
        path = self.folder / STATE_FILE
        if not self._ours() or not path.exists():
            return False
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != self.fingerprint:
            log.warning("%s: a checkpoint of other finetuning settings; starting over", self.folder)
            self.finish()
            return False
        tensors = load_file(str(self.folder / saved["weights"]))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if saved["has_best"]:
            self.best.best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        optim_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim_state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": saved["optim_groups"]})
        for name, value in saved["loop"].items():
            setattr(state, name, value)
        set_rng_state(saved["rng"])
        self.generator.set_state(state_from_text(saved["shuffle"]))
        log.info("resuming finetuning from %s after epoch %d", self.folder, state.epoch - 1)
        return True

    def _ours(self) -> bool:
        owner = read_owner(self.folder)
        return owner is not None and owner["command"] == RESUME_COMMAND

    def finish(self) -> None:
        """Remove the checkpoint folder (only one ehrfm wrote)."""
        if self.folder.exists() and self._ours():
            shutil.rmtree(self.folder)

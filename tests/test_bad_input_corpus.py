"""A corpus of bad inputs and faults, run through the `ehrfm` command as a user would (issue 12).

Every case states the exit code and a pattern its message must match, and the test checks for each:

* an expected error is one line ``error: ...`` on stderr, no traceback;
* every file that existed before (the case's own files and the shared fixtures) is unchanged, by sha256;
  cases whose folder ehrfm legitimately renames (a quarantined checkpoint) compare file contents instead;
* no complete-looking output: a refused ``--out`` is left exactly as it was, and no temp folder remains.

Classes: output folders that are someone else's or an input (data loss), planted and corrupted checkpoint
files (code execution, integrity), a non-finite loss, data that changed under a run, input sanity of
prepare (codes, values, times, config ranges, FHIR), and the error boundary of every command.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import polars as pl
import pytest

from ehrfm.cli import main
from ehrfm.outputs import OWNER_FILE, read_owner

TINY_LLAMA = [
    "--model",
    "llama",
    "--size",
    "tiny",
    "--strategy",
    "ddp",
    "data.context_length=32",
    "data.batch_size=4",
    "data.pack_window=16",
    "train.progress_bar=false",
    "model.overrides.hidden_size=32",
    "model.overrides.num_hidden_layers=2",
    "model.overrides.num_attention_heads=2",
    "model.overrides.intermediate_size=64",
    "model.overrides.time_embedding_size=8",
    "train.val_every=2",
    "checkpoint.every=2",
    "checkpoint.keep=5",
]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def pretrain_argv(data: Path, run: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(run), *TINY_LLAMA, f"train.max_steps={steps}", *extra]


def run_subprocess(argv: list[str]) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ehrfm.cli", *argv], env=_env(), capture_output=True, text=True, timeout=600
    )
    return proc.returncode, proc.stderr


def _meds_frame(rows: list[tuple]) -> pl.DataFrame:
    """rows of (subject_id, time, code, numeric_value)."""
    return pl.DataFrame(
        {
            "subject_id": [r[0] for r in rows],
            "time": [r[1] for r in rows],
            "code": [r[2] for r in rows],
            "numeric_value": [r[3] for r in rows],
        },
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float64},
    )


def _base_rows() -> list[tuple]:
    rows = []
    for sid in range(1, 13):
        born = dt.datetime(1950 + sid, 1, 1)
        rows += [
            (sid, born, "MEDS_BIRTH", None),
            (sid, dt.datetime(2000, 1, sid), "ICD10CM/I10", None),
            (sid, dt.datetime(2001, 2, sid), "LOINC/2345-7", 90.0 + sid),
            (sid, dt.datetime(2002, 3, sid), "RX/1", None),
        ]
    return rows


def write_meds(root: Path, rows: list[tuple]) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    _meds_frame(rows).write_parquet(root / "data" / "0.parquet")
    return root


# -- fixtures -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class World:
    root: Path
    meds: Path  # a MEDS dataset (meds-testing-helpers)
    data: Path  # `ehrfm prepare` of it
    run: Path  # `ehrfm pretrain`: checkpoints at steps 2 and 4
    hf: Path  # `ehrfm export` of the run

    def copy_run(self, dest: Path) -> Path:
        shutil.copytree(self.run, dest, symlinks=True)
        return dest


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("corpus")
    exe = Path(sys.executable).with_name("build_sample_MEDS_dataset")
    subprocess.run(
        [str(exe), f"output_dir={root / 'meds'}", "N_subjects=40", "seed=2"], check=True, capture_output=True
    )
    assert (
        main(
            [
                "prepare",
                "--input",
                str(root / "meds"),
                "--out",
                str(root / "data"),
                "--no-progress",
                "tasks=[]",
                "splits.respect_meds_splits=false",
            ]
        )
        == 0
    )
    code, err = run_subprocess(pretrain_argv(root / "data", root / "run"))
    assert code == 0, err[-3000:]
    assert main(["export", "--run", str(root / "run"), "--out", str(root / "hf")]) == 0
    return World(root, root / "meds", root / "data", root / "run", root / "hf")


def snapshot(roots: list[Path]) -> dict[str, str]:
    """path -> sha256 of every file under ``roots`` (a root that is a file counts as itself)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# -- the cases --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    argv: list[str]
    code: int = 2
    message: str = ""  # regex the stderr must match (expected errors) or "" for successes
    out: Path | None = None  # the --out that must show no complete-looking output when refused
    protect: list[Path] = dataclasses.field(default_factory=list)  # files under these must not change
    contents_only: list[Path] = dataclasses.field(default_factory=list)  # same multiset of file contents
    subprocess: bool = False
    check: Callable[[], None] | None = None  # more assertions after the run


def foreign_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    (path / "config.yaml").write_text("mine: true\n")
    return path


def prepare_argv(src: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--input", str(src), "--out", str(out), "--no-progress", "tasks=[]", *extra]


def _owned_by(command: str, path: Path) -> Path:
    path.mkdir(parents=True)
    (path / OWNER_FILE).write_text(json.dumps({"command": command, "complete": True}))
    (path / "payload.bin").write_bytes(b"\x00" * 10)
    return path


def _planted_pickle(sentinel: Path) -> bytes:
    class Planted:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    return pickle.dumps(Planted())


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step_*"))


def _tamper(run: Path, how: str, which: str, sentinel: Path) -> None:
    targets = _checkpoints(run)[-1:] if which == "latest" else _checkpoints(run)
    for ckpt in targets:
        if how == "planted_metadata":
            (ckpt / ".metadata").write_bytes(_planted_pickle(sentinel))
        elif how == "planted_extra":
            (ckpt / "extra.pt").write_bytes(_planted_pickle(sentinel))
        elif how == "flipped_bytes":
            shard = next(ckpt.glob("*.distcp"))
            raw = bytearray(shard.read_bytes())
            raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\xff" * 64
            shard.write_bytes(bytes(raw))
        elif how == "truncated":
            shard = next(ckpt.glob("*.distcp"))
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
        elif how == "no_manifest":
            (ckpt / "checkpoint_manifest.json").unlink()
        elif how == "weights_nan":
            import torch
            from safetensors.torch import load_file, save_file

            weights = load_file(str(ckpt / "model.safetensors"))
            weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
            save_file(weights, str(ckpt / "model.safetensors"))


def case_output_folders(w: World, t: Path) -> dict[str, Case]:
    cases = {}
    out = foreign_folder(t / "mine")
    cases["prepare_foreign_out"] = Case(
        prepare_argv(w.meds, out), message=r"mine.*not an output of `ehrfm prepare`", out=out
    )
    cases["prepare_out_is_input"] = Case(
        prepare_argv(w.meds, w.meds), message=r"may not contain each other", out=w.meds
    )
    cases["prepare_out_inside_input"] = Case(
        prepare_argv(w.meds, w.meds / "data" / "out"), message="may not contain each other"
    )
    cases["prepare_input_inside_out"] = Case(prepare_argv(w.meds, w.meds.parent), message="may not contain each other")
    cases["prepare_overwrite_still_not_input"] = Case(
        prepare_argv(w.meds, w.meds, "--overwrite"), message="may not contain each other"
    )
    (t / "afile").write_text("x")
    cases["prepare_out_is_a_file"] = Case(prepare_argv(w.meds, t / "afile"), message="not a folder", out=t / "afile")
    other = _owned_by("export", t / "exported")
    cases["prepare_out_of_another_command"] = Case(
        prepare_argv(w.meds, other), message=r"written by `ehrfm export`", out=other
    )
    cfg_dir = _owned_by("prepare", t / "prep_with_cfg")
    (cfg_dir / "prepare.yaml").write_text("vocab:\n  num_bins: 5\n")
    cases["prepare_out_holds_its_config"] = Case(
        [*prepare_argv(w.meds, cfg_dir), "--config", str(cfg_dir / "prepare.yaml")],
        message="may not contain each other",
        out=cfg_dir,
    )
    cases["export_out_is_run"] = Case(
        ["export", "--run", str(w.run), "--out", str(w.run)], message="may not contain each other"
    )
    cases["export_out_inside_run"] = Case(
        ["export", "--run", str(w.run), "--out", str(w.run / "hf")], message="may not contain each other"
    )
    out = foreign_folder(t / "mine_export")
    cases["export_foreign_out"] = Case(
        ["export", "--run", str(w.run), "--out", str(out)], message="not an output of `ehrfm export`", out=out
    )
    cases["export_over_prepared_data"] = Case(
        ["export", "--run", str(w.run), "--out", str(w.data)], message="written by `ehrfm prepare`", out=w.data
    )
    out = foreign_folder(t / "mine_ft")
    cases["finetune_foreign_out"] = Case(
        ["finetune", "--model", str(w.hf), "--data", str(w.data), "--out", str(out)],
        message="not an output of `ehrfm finetune`",
        out=out,
    )
    cases["finetune_out_is_model"] = Case(
        ["finetune", "--model", str(w.hf), "--data", str(w.data), "--out", str(w.hf)],
        message="may not contain each other",
    )
    cases["finetune_out_inside_data"] = Case(
        ["finetune", "--model", str(w.hf), "--data", str(w.data), "--out", str(w.data / "ft")],
        message="may not contain each other",
    )
    out = foreign_folder(t / "mine_eval")
    cases["evaluate_foreign_out"] = Case(
        ["evaluate", "--model", str(w.hf), "--data", str(w.data), "--out", str(out)],
        message="not an output of `ehrfm evaluate`",
        out=out,
    )
    cases["evaluate_out_is_model"] = Case(
        ["evaluate", "--model", str(w.hf), "--data", str(w.data), "--out", str(w.hf)],
        message="may not contain each other",
    )
    out = foreign_folder(t / "mine_base")
    cases["baseline_foreign_out"] = Case(
        ["baseline", "--model", "logreg", "--data", str(w.data), "--out", str(out)],
        message="not an output of `ehrfm baseline`",
        out=out,
    )
    cases["embed_out_is_data"] = Case(
        ["embed", "--model", str(w.hf), "--data", str(w.data), "--out", str(w.data)],
        message="may not contain each other",
    )
    out = foreign_folder(t / "mine_run")
    cases["pretrain_foreign_out"] = Case(
        pretrain_argv(w.data, out), message=r"mine_run.*not an output of `ehrfm pretrain`", out=out
    )
    cases["pretrain_out_is_data"] = Case(pretrain_argv(w.data, w.data), message="may not contain each other")
    cases["pretrain_out_inside_data"] = Case(
        pretrain_argv(w.data, w.data / "run"), message="may not contain each other"
    )
    out = foreign_folder(t / "mine_demo")
    cases["demo_foreign_out"] = Case(
        ["demo", "--input", str(w.meds), "--format", "meds", "--out", str(out)],
        message="not an output of `ehrfm demo`",
        out=out,
    )
    task = t / "evil_task.yaml"
    task.write_text(
        "tasks:\n  - name: ../../escaped\n    token: '[ESC]'\n    anchor: {kind: encounter_end}\n"
        "    outcome: {kind: death, window_days: 30}\n"
    )
    cases["task_name_escapes_output"] = Case(
        ["prepare", "--input", str(w.meds), "--out", str(t / "p_task"), "--no-progress", f"tasks=[{task}]"],
        message=r"escaped",
        out=t / "p_task",
        check=lambda: _nothing_outside(t),
    )
    return cases


def _nothing_outside(t: Path) -> None:
    assert not list(t.parent.rglob("escaped*")) and not list(t.parent.parent.glob("escaped*"))


TAMPERINGS = ("planted_metadata", "planted_extra", "flipped_bytes", "truncated", "no_manifest")
# Refusal (the tampering hits every checkpoint) and fallback (it hits the latest: quarantine, resume from the
# previous one, train on) are one code path each whatever the tampering; every tampering takes at least one of
# them, and each case costs an `ehrfm pretrain` process (10-15 s), hence not all ten combinations.
REFUSAL_CASES = ("planted_metadata", "planted_extra", "no_manifest")
FALLBACK_CASES = ("planted_metadata", "flipped_bytes", "truncated")


def case_checkpoints(w: World, t: Path) -> dict[str, Case]:
    cases = {}
    for how in TAMPERINGS:
        sentinel = t / f"sentinel-{how}"
        if how in REFUSAL_CASES:
            run = w.copy_run(t / f"run_all_{how}")
            _tamper(run, how, "every", sentinel)
            cases[f"resume_{how}_everywhere_refused"] = Case(
                pretrain_argv(w.data, run),
                message=r"no checkpoint passes its integrity check",
                contents_only=[run],
                subprocess=True,
                check=lambda s=sentinel: _not_executed(s),
            )
        if how not in FALLBACK_CASES:
            continue
        run = w.copy_run(t / f"run_latest_{how}")
        _tamper(run, how, "latest", sentinel)
        cases[f"resume_{how}_latest_falls_back"] = Case(
            pretrain_argv(w.data, run, steps=6),
            code=0,
            subprocess=True,
            check=lambda s=sentinel, r=run: _fell_back(s, r),
        )
    run = w.copy_run(t / "run_export_flipped")
    _tamper(run, "flipped_bytes", "latest", t / "unused")
    cases["export_corrupted_checkpoint"] = Case(
        ["export", "--run", str(run), "--out", str(t / "hf_corrupt")],
        message=r"step_00000004.*distcp.*sha256 differs",
        out=t / "hf_corrupt",
    )
    run = w.copy_run(t / "run_export_planted")
    _tamper(run, "planted_extra", "latest", t / "sentinel-export")
    cases["export_planted_file"] = Case(
        ["export", "--run", str(run), "--out", str(t / "hf_planted")],
        message=r"extra\.pt: file not recorded",
        out=t / "hf_planted",
        check=lambda: _not_executed(t / "sentinel-export"),
    )
    run = w.copy_run(t / "run_nan_weights")
    _tamper(run, "weights_nan", "latest", t / "unused")
    cases["export_nan_weights_with_stale_manifest"] = Case(
        ["export", "--run", str(run), "--out", str(t / "hf_nan")],
        message=r"model\.safetensors.*(bytes|sha256)",
        out=t / "hf_nan",
    )
    return cases


def _not_executed(sentinel: Path) -> None:
    assert not sentinel.exists(), "a planted pickle ran"


def _fell_back(sentinel: Path, run: Path) -> None:
    _not_executed(sentinel)
    quarantined = list((run / "checkpoints").glob("corrupt-step_00000004*"))
    assert quarantined, "the corrupted checkpoint was not moved aside"
    assert (run / "checkpoints" / "step_00000006" / "COMPLETE").exists()


def case_training(w: World, t: Path) -> dict[str, Case]:
    cases = {}
    run = t / "run_nan"
    cases["non_finite_loss_stops_without_checkpoint"] = Case(
        pretrain_argv(
            w.data, run, "optim.lr=1e30", "optim.warmup_fraction=0", "checkpoint.every=1", "train.val_every=0"
        ),
        message=r"non-finite training loss",
        subprocess=True,
        check=lambda r=run: _no_nan_checkpoint(r),
    )
    for name, override in (("vocab_fingerprint", "splits.seed=5"), ("vocab_size", "vocab.num_bins=3")):
        data = t / f"data_{name}"
        shutil.copytree(w.data, data)
        run = w.copy_run(t / f"run_{name}")
        _retarget(run, w.data, data)
        assert main(prepare_argv(w.meds, data, "splits.respect_meds_splits=false", override)) == 0
        cases[f"resume_on_changed_data_{name}"] = Case(
            pretrain_argv(data, run, steps=6), message=name, protect=[run, data], subprocess=True
        )
        cases[f"export_on_changed_data_{name}"] = Case(
            ["export", "--run", str(run), "--out", str(t / f"hf_{name}")],
            message=name,
            protect=[run, data],
            out=t / f"hf_{name}",
        )
    return cases


def case_error_boundary(w: World, t: Path) -> dict[str, Case]:
    """Expected errors of the other commands: one line, exit 2, nothing written."""
    return {
        "pretrain_negative_lr": Case(
            pretrain_argv(w.data, t / "run_lr", "optim.lr=-1"), message=r"optim\.lr.*-1", out=t / "run_lr"
        ),
        "pretrain_not_prepared_data": Case(
            pretrain_argv(w.meds, t / "run_meds"), message=r"not a prepared ehrfm data folder", out=t / "run_meds"
        ),
        "export_run_without_checkpoints": Case(
            ["export", "--run", str(t / "empty_run"), "--out", str(t / "hf_none")],
            message=r"no complete checkpoint",
            out=t / "hf_none",
        ),
        "evaluate_a_model_that_is_not_finetuned": Case(
            ["evaluate", "--model", str(w.hf), "--data", str(w.data), "--out", str(t / "ev_none")],
            message=r"not a finetuned ehrfm model",
            out=t / "ev_none",
        ),
        "forecast_foreign_out": Case(
            ["forecast", "--model", str(w.hf), "--data", str(w.data), "--out", str(foreign_folder(t / "zs"))],
            message="not an output of `ehrfm forecast`",
            out=t / "zs",
        ),
        "forecast_zero_samples": Case(
            ["forecast", "--model", str(w.hf), "--data", str(w.data), "--out", str(t / "zs0"), "--samples", "0"],
            message=r"sampling\.samples",
            out=t / "zs0",
        ),
    }


def _retarget(run: Path, old: Path, new: Path) -> None:
    """Point a copied run at another data folder, as if that folder had been the one trained on (the copied
    checkpoints' configs change, so their integrity manifests are rewritten as the trainer would write them)."""
    from ehrfm.pretrain.checkpoint import write_integrity_manifest

    for cfg in [run / "config.yaml", *run.glob("checkpoints/step_*/config.yaml")]:
        cfg.write_text(cfg.read_text().replace(str(old), str(new)))
    for ckpt in _checkpoints(run):
        (ckpt / "checkpoint_manifest.json").unlink()
        write_integrity_manifest(ckpt)


def _no_nan_checkpoint(run: Path) -> None:
    steps = [p.name for p in _checkpoints(run)]
    assert steps == ["step_00000001"], steps  # step 1 was finite; the diverged step 2 wrote nothing


def case_input_sanity(w: World, t: Path) -> dict[str, Case]:
    cases = {}

    def prepared(
        name: str,
        rows: list[tuple],
        *extra: str,
        code: int = 0,
        message: str = "",
        check: Callable[[dict], None] | None = None,
    ) -> Case:
        src = write_meds(t / f"in_{name}", rows)
        out = t / f"out_{name}"
        after = None if check is None else (lambda: check(json.loads((out / "manifest.json").read_text())))
        return Case(
            prepare_argv(src, out, "splits.respect_meds_splits=false", *extra),
            code=code,
            message=message,
            out=out if code else None,
            protect=[src],
            check=after,
        )

    rows = _base_rows()
    cases["code_equals_pad_token"] = prepared(
        "pad", rows + [(3, dt.datetime(2003, 1, 1), "[PAD]", None)], check=lambda m: _counted(m, "reserved")
    )
    cases["code_equals_task_token"] = prepared(
        "mor",
        rows + [(4, dt.datetime(2003, 1, 1), "[MOR]", None)],
        "tasks=[ehrmamba]",
        check=lambda m: _counted(m, "reserved"),
    )
    cases["nan_value"] = prepared(
        "nan",
        rows + [(5, dt.datetime(2003, 1, 1), "LOINC/2345-7", float("nan"))],
        check=lambda m: _counted(m, "non_finite|nan"),
    )
    cases["inf_value"] = prepared(
        "inf",
        rows + [(5, dt.datetime(2003, 1, 1), "LOINC/2345-7", float("inf"))],
        check=lambda m: _counted(m, "non_finite|inf"),
    )
    cases["float64_beyond_float32"] = prepared(
        "big",
        rows + [(6, dt.datetime(2003, 1, 1), "LOINC/2345-7", 1e300)],
        check=lambda m: _counted(m, "float32|non_finite|overflow"),
    )
    cases["year_9999_event"] = prepared(
        "y9999", rows + [(7, dt.datetime(9999, 1, 1), "ICD10CM/I10", None)], check=lambda m: _data_end_before(m, 2100)
    )
    cases["year_1800_event"] = prepared(
        "y1800", rows + [(8, dt.datetime(1800, 1, 1), "ICD10CM/I10", None)], check=lambda m: _counted(m, "bounds")
    )
    cases["negative_num_bins"] = prepared("bins", rows, "vocab.num_bins=-3", code=2, message=r"vocab\.num_bins.*-3")
    cases["split_fractions_not_summing_to_one"] = prepared(
        "fractions", rows, "splits.test=0.5", code=2, message=r"splits"
    )
    cases["unknown_config_key"] = prepared("key", rows, "vocab.nope=1", code=2, message=r"vocab\.nope")
    cases["missing_input_folder"] = Case(prepare_argv(t / "nowhere", t / "out_nowhere"), message=r"nowhere")
    bad = write_meds(t / "in_nocode", rows)
    _meds_frame(rows).drop("code").write_parquet(bad / "data" / "0.parquet")
    cases["meds_missing_column"] = Case(
        prepare_argv(bad, t / "out_nocode"), message=r"0\.parquet.*code", out=t / "out_nocode", protect=[bad]
    )
    old = write_meds(t / "in_meds03", rows)  # MEDS 0.3 names: patient_id, timestamp
    _meds_frame(rows).rename({"subject_id": "patient_id", "time": "timestamp"}).write_parquet(
        old / "data" / "0.parquet"
    )
    (old / "metadata").mkdir()
    (old / "metadata" / "dataset.json").write_text('{"dataset_name": "old", "meds_version": "0.3.3"}')
    cases["meds_old_version"] = Case(
        prepare_argv(old, t / "out_meds03"),
        message=r"0\.parquet.*\['subject_id', 'time'\].*patient_id.*reads MEDS 0\.4.*declares meds_version '0\.3\.3'",
        out=t / "out_meds03",
        protect=[old],
    )
    fhir = t / "fhir_string_value"
    fhir.mkdir()
    (fhir / "p1.json").write_bytes(orjson.dumps(_bundle("p1", value="12.5 mmol")))
    cases["fhir_value_quantity_string"] = Case(
        [
            "prepare",
            "--input",
            str(fhir),
            "--format",
            "fhir",
            "--out",
            str(t / "out_fhir_str"),
            "--no-progress",
            "tasks=[]",
        ],
        code=0,
        protect=[fhir],
        check=lambda: _fhir_counted(t / "out_fhir_str", "obs-p1"),
    )
    split = t / "fhir_split_patient"
    split.mkdir()
    (split / "a.json").write_bytes(orjson.dumps(_bundle("pat-42")))
    (split / "b.json").write_bytes(orjson.dumps(_bundle("pat-42", obs_id="obs-2")))
    cases["fhir_patient_in_two_bundles"] = Case(
        [
            "prepare",
            "--input",
            str(split),
            "--format",
            "fhir",
            "--out",
            str(t / "out_split"),
            "--no-progress",
            "tasks=[]",
        ],
        message=r"a\.json.*b\.json.*pat-42|pat-42.*a\.json.*b\.json",
        out=t / "out_split",
        protect=[split],
    )
    return cases


def _bundle(pid: str, value="7.2", obs_id: str | None = None) -> dict:
    obs_id = obs_id or f"obs-{pid}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{pid}",
                "resource": {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1950-01-01"},
            },
            {
                "fullUrl": f"urn:uuid:enc-{obs_id}",
                "resource": {
                    "resourceType": "Encounter",
                    "id": f"enc-{obs_id}",
                    "class": {"code": "AMB"},
                    "subject": {"reference": f"urn:uuid:{pid}"},
                    "period": {"start": "2001-01-01T10:00:00Z", "end": "2001-01-01T11:00:00Z"},
                },
            },
            {
                "fullUrl": f"urn:uuid:{obs_id}",
                "resource": {
                    "resourceType": "Observation",
                    "id": obs_id,
                    "subject": {"reference": f"urn:uuid:{pid}"},
                    "encounter": {"reference": f"urn:uuid:enc-{obs_id}"},
                    "effectiveDateTime": "2001-01-01T10:30:00Z",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
                    "valueQuantity": {"value": value, "unit": "mmol/L"},
                },
            },
        ],
    }


def _flat(obj, prefix="") -> dict[str, object]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _counted(manifest: dict, pattern: str) -> None:
    counters = {
        k: v
        for k, v in _flat({"cleaning": manifest["cleaning"], "fhir": manifest.get("fhir")}).items()
        if re.search(pattern, k, re.I) and isinstance(v, int) and v > 0
    }
    assert counters, f"no positive counter matching {pattern!r} in {manifest['cleaning']}"


def _data_end_before(manifest: dict, year: int) -> None:
    assert int(manifest["data_end"][:4]) < year, manifest["data_end"]
    _counted(manifest, "bounds")


def _fhir_counted(out: Path, resource_id: str) -> None:
    text = (out / "manifest.json").read_text()
    assert resource_id in text, "the skipped value's resource id is not reported"


CASE_GROUPS = (case_output_folders, case_checkpoints, case_training, case_input_sanity, case_error_boundary)


@pytest.fixture(scope="module")
def corpus(world, tmp_path_factory) -> dict[str, Case]:
    cases = {}
    for group in CASE_GROUPS:
        folder = tmp_path_factory.mktemp(group.__name__)
        made = group(world, folder)
        assert not set(made) & set(cases)
        cases.update(made)
    return cases


CASE_NAMES = [
    *(
        "prepare_foreign_out",
        "prepare_out_is_input",
        "prepare_out_inside_input",
        "prepare_input_inside_out",
        "prepare_overwrite_still_not_input",
        "prepare_out_is_a_file",
        "prepare_out_of_another_command",
        "prepare_out_holds_its_config",
        "export_out_is_run",
        "export_out_inside_run",
        "export_foreign_out",
        "export_over_prepared_data",
        "finetune_foreign_out",
        "finetune_out_is_model",
        "finetune_out_inside_data",
        "evaluate_foreign_out",
        "evaluate_out_is_model",
        "baseline_foreign_out",
        "embed_out_is_data",
        "pretrain_foreign_out",
        "pretrain_out_is_data",
        "pretrain_out_inside_data",
        "demo_foreign_out",
        "task_name_escapes_output",
    ),
    *(f"resume_{how}_everywhere_refused" for how in REFUSAL_CASES),
    *(f"resume_{how}_latest_falls_back" for how in FALLBACK_CASES),
    "export_corrupted_checkpoint",
    "export_planted_file",
    "export_nan_weights_with_stale_manifest",
    "non_finite_loss_stops_without_checkpoint",
    *(f"{cmd}_on_changed_data_{what}" for what in ("vocab_fingerprint", "vocab_size") for cmd in ("resume", "export")),
    "code_equals_pad_token",
    "code_equals_task_token",
    "nan_value",
    "inf_value",
    "float64_beyond_float32",
    "year_9999_event",
    "year_1800_event",
    "negative_num_bins",
    "split_fractions_not_summing_to_one",
    "unknown_config_key",
    "missing_input_folder",
    "meds_missing_column",
    "meds_old_version",
    "fhir_value_quantity_string",
    "fhir_patient_in_two_bundles",
    "pretrain_negative_lr",
    "pretrain_not_prepared_data",
    "export_run_without_checkpoints",
    "evaluate_a_model_that_is_not_finetuned",
    "forecast_foreign_out",
    "forecast_zero_samples",
]


def test_corpus_has_at_least_40_cases():
    assert len(CASE_NAMES) == len(set(CASE_NAMES)) >= 40


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(name, corpus, world, capsys):
    case = corpus[name]
    shared = [world.meds, world.data, world.run, world.hf]
    protected = [p for p in [*shared, *case.protect, case.out] if p is not None and p.exists()]
    before = snapshot(protected)
    contents_before = sorted(snapshot(case.contents_only).values())
    out_existed = case.out is not None and case.out.exists()
    if case.subprocess:
        code, err = run_subprocess(case.argv)
    else:
        capsys.readouterr()
        code = main(case.argv)
        err = capsys.readouterr().err
    assert code == case.code, f"exit {code} != {case.code}\n{err[-3000:]}"
    if case.code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert re.search(case.message, errors[0]), f"{case.message!r} not in {errors[0]!r}"
    assert snapshot(protected) == before, "a pre-existing file changed"
    assert sorted(snapshot(case.contents_only).values()) == contents_before, "a pre-existing file changed"
    if case.out is not None:
        assert case.out.exists() == out_existed
        if case.out.is_dir() and case.code == 2:
            owner = read_owner(case.out)
            assert owner is None or owner.get("command") != case.argv[0] or out_existed
        assert not list(case.out.parent.glob(f"{case.out.name}.tmp-*")), "a temp folder was left behind"
    if case.check is not None:
        case.check()


def test_prepare_replaces_its_own_output(world, tmp_path):
    """The positive control of the rule: an output of the same command is replaced, and the owner file says so."""
    out = tmp_path / "again"
    assert main(prepare_argv(world.meds, out, "splits.respect_meds_splits=false")) == 0
    assert main(prepare_argv(world.meds, out, "splits.respect_meds_splits=false", "vocab.num_bins=3")) == 0
    owner = read_owner(out)
    assert owner["command"] == "prepare" and owner["complete"] and owner["fingerprint"]
    assert not list(tmp_path.glob("again.old-*")) and not list(tmp_path.glob("again.tmp-*"))


def test_overwrite_replaces_a_foreign_folder_only_when_asked(world, tmp_path):
    out = foreign_folder(tmp_path / "mine")
    assert main(prepare_argv(world.meds, out)) == 2
    assert (out / "thesis.txt").exists()
    assert main(prepare_argv(world.meds, out, "--overwrite")) == 0
    assert (out / "manifest.json").exists() and not (out / "thesis.txt").exists()

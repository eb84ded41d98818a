"""Output folders that ehrfm owns: it replaces only what it wrote, and never an input.

Every folder an ehrfm command writes carries an owner file, :data:`OWNER_FILE` (JSON): the command that wrote
it, the resolved input paths, a fingerprint of those inputs where the command has one, the ehrfm version and
whether the folder is complete. The rules, enforced by :func:`check_output_dir` before anything is written:

* ``--out`` and every input of the same command may not contain each other (nor be the same folder);
* a missing or empty ``--out`` is always fine;
* an existing non-empty ``--out`` is replaced only when its owner file names the *same* command, or with an
  explicit ``--overwrite`` (which still never reaches an input: the first rule comes first);
* anything else is refused with :class:`OutputDirError` naming the folder; nothing is deleted.

Finished outputs appear atomically (:func:`atomic_output`): the command writes into a temp folder beside
``--out`` that already carries an owner file marked incomplete, and only a complete one is renamed into
place. Leftover temp folders of killed runs are removed only if their owner file says ehrfm made them and the
process that made them is gone. Run folders of `ehrfm pretrain` are written in place (they resume), so they
are only claimed (:func:`claim_run_dir`), never replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import EhrfmError

OWNER_FILE = ".ehrfm-output.json"


class OutputDirError(EhrfmError, ValueError):
    """An output folder ehrfm may not write (someone else's data, or an input of the same command)."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_file(path: Path, *, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a sibling temp path to write ``path`` through; when the block finishes it is renamed over ``path``
    (readers see the old file or the new one, never a part), on an error it is removed. ``suffix`` ends the temp
    name (for writers that pick a format by extension); ``fsync`` flushes it to disk before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def save_figure_atomic(fig, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG through a sibling temp file and a rename, then close it."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
        plt.close(fig)
    return Path(path)


def read_owner(folder: Path) -> dict | None:
    """The owner record of ``folder``, or None when it has none (or an unreadable one)."""
    path = Path(folder) / OWNER_FILE
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("command"), str) else None


def _resolved(paths: Sequence[str | os.PathLike | None]) -> list[Path]:
    return [Path(p).expanduser().resolve() for p in paths if p is not None and str(p) != ""]


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_dir(
    out: Path,
    command: str,
    *,
    inputs: Sequence[str | os.PathLike | None] = (),
    overwrite: bool = False,
    has_overwrite_flag: bool = True,
) -> None:
    """Raise :class:`OutputDirError` unless ``ehrfm <command>`` may (re)place ``out`` (module docstring);
    ``has_overwrite_flag`` says whether the error may suggest ``--overwrite`` (run folders have none)."""
    out = Path(out)
    target = out.expanduser().resolve()
    for source in _resolved(inputs):
        if _contains(target, source) or _contains(source, target):
            raise OutputDirError(
                f"output folder {out} and input {source} of `ehrfm {command}` may not contain each other; "
                "choose an --out outside the inputs"
            )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputDirError(f"output folder {out} exists and is not a folder; refusing to replace it")
    if not any(out.iterdir()):
        return
    owner = read_owner(out)
    if owner is not None and owner["command"] == command:
        return
    if overwrite:
        return
    found = f"it was written by `ehrfm {owner['command']}`" if owner else f"it has no {OWNER_FILE} from ehrfm"
    raise OutputDirError(
        f"output folder {out} is not empty and is not an output of `ehrfm {command}` ({found}); refusing to "
        f"{'replace' if has_overwrite_flag else 'write into'} it: choose another --out"
        f"{', empty it yourself, or pass --overwrite' if has_overwrite_flag else ' or empty it yourself'}"
    )


def owner_record(
    command: str, inputs: Sequence[str | os.PathLike | None], *, fingerprint: str | None = None, complete: bool
) -> dict:
    from . import __version__

    return {
        "command": command,
        "inputs": [str(p) for p in _resolved(inputs)],
        "fingerprint": fingerprint,
        "ehrfm_version": __version__,
        "complete": complete,
        "pid": os.getpid(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(out: Path) -> None:
    """Remove ``out.tmp-<pid>`` folders left by killed ehrfm runs (owner file present, process gone)."""
    for stale in out.parent.glob(f"{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        owner = read_owner(stale)
        if owner is None or owner.get("complete") or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def new_temp_dir(out: Path, command: str, inputs: Sequence[str | os.PathLike | None] = ()) -> Path:
    """A fresh ``out.tmp-<pid>`` beside ``out``, owned by ``command`` and marked incomplete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        raise OutputDirError(f"{tmp} exists and was not made by this process; remove it or choose another --out")
    tmp.mkdir()
    write_json_atomic(tmp / OWNER_FILE, owner_record(command, inputs, complete=False))
    return tmp


def commit_output_dir(
    tmp: Path,
    out: Path,
    command: str,
    inputs: Sequence[str | os.PathLike | None] = (),
    *,
    fingerprint: str | None = None,
    overwrite: bool = False,
) -> None:
    """Mark ``tmp`` complete and rename it to ``out``, replacing an older ``out`` that the rules allow."""
    tmp, out = Path(tmp), Path(out)
    write_json_atomic(tmp / OWNER_FILE, owner_record(command, inputs, fingerprint=fingerprint, complete=True))
    if out.exists():
        check_output_dir(out, command, inputs=inputs, overwrite=overwrite)  # again: it may have changed meanwhile
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


@contextmanager
def atomic_output(
    out: Path,
    command: str,
    *,
    inputs: Sequence[str | os.PathLike | None] = (),
    overwrite: bool = False,
    fingerprint: str | None = None,
) -> Iterator[Path]:
    """Check ``out`` (:func:`check_output_dir`), yield a temp folder to fill, and rename it into place when the
    block finishes; on any error the temp folder is removed and ``out`` is left as it was.

    ``fingerprint`` may also be set later through the yielded folder's :func:`set_fingerprint`.
    """
    check_output_dir(out, command, inputs=inputs, overwrite=overwrite)
    tmp = new_temp_dir(out, command, inputs)
    try:
        yield tmp
        recorded = read_owner(tmp) or {}
        commit_output_dir(
            tmp, out, command, inputs, fingerprint=recorded.get("fingerprint") or fingerprint, overwrite=overwrite
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_fingerprint(tmp: Path, fingerprint: str) -> None:
    """Record the inputs' fingerprint in a temp output folder's owner file (known only after reading them)."""
    owner = read_owner(tmp) or {}
    owner["fingerprint"] = fingerprint
    write_json_atomic(Path(tmp) / OWNER_FILE, owner)


def add_overwrite_argument(parser) -> None:
    """The ``--overwrite`` flag of a command that replaces its ``--out`` (see the module docstring)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out that this command did not write (never one that is or holds an input)",
    )


def claim_run_dir(
    run_dir: Path, command: str, *, inputs: Sequence[str | os.PathLike | None] = (), write: bool = True
) -> None:
    """Check (:func:`check_output_dir`, no overwrite) that ``run_dir`` is new, empty, or a run folder of
    ``command``; with ``write``, create it and its owner file when missing. Run folders are appended to and
    resumed, never replaced."""
    check_output_dir(run_dir, command, inputs=inputs, has_overwrite_flag=False)
    if not write:
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if read_owner(run_dir) is None:
        write_json_atomic(run_dir / OWNER_FILE, owner_record(command, inputs, complete=True))

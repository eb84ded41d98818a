"""Isolated environments for MEDS ecosystem tools whose pins conflict with ehrfm's own dependencies.

ACES (``es-aces`` 0.7) requires ``polars<2``; MEDS-Tab (``meds-tab`` 0.2) requires ``polars<2`` (through
MEDS-transforms) and ``meds-evaluation==0.0.3``. ehrfm runs on polars 2 and meds-evaluation 0.0.6, so installing
either tool beside it would downgrade ehrfm's own libraries. ehrfm therefore runs them as command-line tools
from their own virtual environments, one per tool, created by ``ehrfm tools install NAME`` under
``$EHRFM_TOOLS_HOME`` (default ``$EHRFM_CACHE/tools``, ``~/.cache/ehrfm/tools``) with the versions ehrfm was tested against
(:data:`TOOLS`). A tool's commands are looked up there first, then on ``PATH`` (e.g. installed with pipx or
``uv tool``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import EhrfmError


class ToolError(EhrfmError):
    """A MEDS tool is missing or failed; the message says how to install it or what it reported."""


@dataclasses.dataclass(frozen=True)
class Tool:
    requirement: str  # the pip requirement ehrfm installs and was tested with
    commands: tuple[str, ...]  # its console scripts that ehrfm calls


TOOLS = {
    "aces": Tool("es-aces==0.7.3", ("aces-cli",)),
    "meds-tab": Tool(
        "meds-tab==0.2.0",
        (
            "meds-tab-describe",
            "meds-tab-tabularize-static",
            "meds-tab-tabularize-time-series",
            "meds-tab-cache-task",
            "meds-tab-model",
        ),
    ),
}


def tools_home() -> Path:
    if os.environ.get("EHRFM_TOOLS_HOME"):
        return Path(os.environ["EHRFM_TOOLS_HOME"])
    return Path(os.environ.get("EHRFM_CACHE") or Path.home() / ".cache" / "ehrfm") / "tools"


def command_path(tool: str, command: str) -> Path:
    """The executable ``command`` of ``tool``: its ehrfm environment first, then PATH; ToolError if neither."""
    if tool not in TOOLS:
        raise ToolError(f"unknown tool {tool!r}; known: {', '.join(TOOLS)}")
    candidate = tools_home() / tool / "bin" / command
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(command)
    if found:
        return Path(found)
    raise ToolError(
        f"{command} ({TOOLS[tool].requirement}) is not installed: run `ehrfm tools install {tool}` (its own "
        f"environment under {tools_home()}; it cannot share ehrfm's, see ehrfm/tool_envs.py) or put {command} on PATH"
    )


def run_tool(tool: str, command: str, args: list[str], *, cwd: Path | None = None, env: dict | None = None) -> str:
    """Run one of a tool's commands; returns its stdout. A failure is a ToolError with the tail of its output."""
    exe = command_path(tool, command)
    done = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ToolError(f"{command} failed (exit {done.returncode}): {' | '.join(tail)}")
    return done.stdout


def install(tool: str, python: str | None = None) -> Path:
    """Create (or update) ``tool``'s environment with its pinned requirement; returns the environment folder."""
    if tool not in TOOLS:
        raise ToolError(f"unknown tool {tool!r}; known: {', '.join(TOOLS)}")
    home = tools_home() / tool
    if not (home / "bin" / "python").exists():
        home.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([python or sys.executable, "-m", "venv", str(home)], check=True)
    done = subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", TOOLS[tool].requirement],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise ToolError(f"installing {TOOLS[tool].requirement} into {home} failed: {done.stderr.strip()[-500:]}")
    return home


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tools",
        help="install / locate MEDS ecosystem tools (ACES, MEDS-Tab) in their own environments",
        description=__doc__,
    )
    sub = p.add_subparsers(dest="tools_command", metavar="ACTION", required=True)
    inst = sub.add_parser("install", help="create a tool's environment with its tested version")
    inst.add_argument("tool", choices=sorted(TOOLS))
    inst.set_defaults(func=_run_install)
    listing = sub.add_parser("list", help="where each tool's commands are found")
    listing.set_defaults(func=_run_list)


def _run_install(args) -> int:
    home = install(args.tool)
    print(f"installed {TOOLS[args.tool].requirement} into {home}")
    return 0


def _run_list(args) -> int:
    for name, tool in TOOLS.items():
        for command in tool.commands:
            try:
                where = str(command_path(name, command))
            except ToolError:
                where = f"not installed (ehrfm tools install {name})"
            print(f"{name:9s} {command:32s} {where}")
    return 0

"""MEDS tools in their own environments: lookup order and the message when a tool is missing."""

from __future__ import annotations

import os

import pytest

from ehrfm.tool_envs import ToolError, command_path, run_tool


def test_missing_tool_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("EHRFM_TOOLS_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(
        ToolError, match=r"aces-cli \(es-aces==0\.7\.3\) is not installed: run `ehrfm tools install aces`"
    ):
        command_path("aces", "aces-cli")
    with pytest.raises(ToolError, match="unknown tool"):
        command_path("nope", "x")


def test_tool_environment_comes_before_path_and_failures_show_the_output(tmp_path, monkeypatch):
    own = tmp_path / "tools" / "aces" / "bin"
    own.mkdir(parents=True)
    script = own / "aces-cli"
    script.write_text("#!/bin/sh\necho 'it went wrong' >&2\nexit 3\n")
    script.chmod(0o755)
    elsewhere = tmp_path / "path"
    elsewhere.mkdir()
    (elsewhere / "aces-cli").write_text("#!/bin/sh\nexit 0\n")
    (elsewhere / "aces-cli").chmod(0o755)
    monkeypatch.setenv("EHRFM_TOOLS_HOME", str(tmp_path / "tools"))
    monkeypatch.setenv("PATH", f"{elsewhere}{os.pathsep}{os.environ['PATH']}")
    assert command_path("aces", "aces-cli") == script
    with pytest.raises(ToolError, match=r"aces-cli failed \(exit 3\): it went wrong"):
        run_tool("aces", "aces-cli", [])
    script.unlink()
    assert command_path("aces", "aces-cli") == elsewhere / "aces-cli"

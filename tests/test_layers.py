"""Imports go one way: core <- kernels <- data_shards <- pretrain <- finetune <- launch <- apps.

Every ``import``/``from`` of an ``ehrfm`` module in the package's source (at module level or inside a function)
is checked against the layer map below; a module of a lower layer importing a higher one fails the test, and
so does a top-level ``ehrfm/`` module missing from the map (place it before adding it). Benchmarks
(``*.bench``) are apps: they compare a kernel inside the models that use it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "ehrfm": "ehrfm",
    "kernels": "ehrfm.kernels",
    "data_shards": "ehrfm.data_shards",
    "pretrain": "ehrfm.pretrain",
    "finetune": "ehrfm.finetune",
    "launch": "ehrfm.launch",
}
CORE = {
    "config",
    "config_flags",
    "errors",
    "logging",
    "seeding",
    "outputs",
    "devices",
    "loop",
    "callbacks",
    "metrics_log",
    "tool_envs",
}
APPS = {"cli", "__main__", "apps"}  # the command, `python -m ehrfm`, and the ehrfm.apps package
LAYERS = ("core", "kernels", "data_shards", "pretrain", "finetune", "launch", "apps")


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # the package itself: __version__ only
    if parts[-1] == "bench":
        return "apps"
    if parts[1] in CORE:
        return "core"
    if parts[1] in APPS:
        return "apps"
    if parts[1] in LAYERS:
        return parts[1]
    raise AssertionError(f"{module}: not in the layer map of tests/test_layers.py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    name = ".".join([FOLDERS[rel.parts[0]], *rel.parts[1:]])[: -len(".py")]
    return name.removesuffix(".__init__")


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            else:
                found.append((node.module, node.lineno))
    return [(name, line) for name, line in found if name and (name == "ehrfm" or name.startswith("ehrfm."))]


def _sources():
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if "templates" not in path.parts:
                yield path


def test_imports_go_one_way():
    upward = []
    for path in _sources():
        module = _module_name(path)
        rank = LAYERS.index(layer_of(module))
        for target, line in _imports(path, module):
            if LAYERS.index(layer_of(target)) > rank:
                upward.append(
                    f"{path.relative_to(REPO)}:{line}: {module} ({layer_of(module)}) imports {target} "
                    f"({layer_of(target)})"
                )
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """Positive control: the parser resolves relative imports, so a kernels module reaching into pretrain is
    caught."""
    path = REPO / "kernels" / "anaa" / "x.py"
    source = tmp_path / "x.py"
    source.write_text("from ...pretrain.models import build_model\n")
    [(target, _)] = _imports(source, "ehrfm.kernels.anaa.x")
    assert target == "ehrfm.pretrain.models" and layer_of(target) == "pretrain"
    assert LAYERS.index(layer_of("ehrfm.kernels.anaa.x")) < LAYERS.index(layer_of(target))
    assert _module_name(path) == "ehrfm.kernels.anaa.x"

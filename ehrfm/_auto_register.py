"""Register the ehrfm backbones with transformers' Auto classes on ``import ehrfm`` without paying for it.

Importing the model code pulls in torch and four HF architectures (seconds), which ``import ehrfm`` and the
CLI should not cost. So ``import ehrfm`` only arranges for registration to happen once transformers' Auto
classes exist: immediately if they are already imported, otherwise as soon as the import that brought them
in has completely finished (registering in the middle of it would re-enter half-initialized transformers
modules). Either way ``import ehrfm; AutoModel.from_pretrained(folder)`` just works.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_AUTO_MODULE = "transformers.models.auto.configuration_auto"  # every Auto class imports it
_done = False


def register_now() -> None:
    global _done
    if _done:
        return
    models = sys.modules.get("ehrfm.pretrain.models")
    if models is not None and not hasattr(models, "register_auto_classes"):
        return  # the models package is importing the Auto classes itself; it registers when it finishes
    _done = True
    _uninstall()
    from ehrfm.pretrain.models import register_auto_classes

    register_auto_classes()


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _maybe_register(just_loaded: str) -> None:
    if _done or _AUTO_MODULE not in sys.modules:
        return
    # `just_loaded` has executed completely; wait while any other transformers module is mid-import
    busy = [n for n in list(sys.modules) if n.startswith("transformers") and n != just_loaded and _initializing(n)]
    if not busy:
        register_now()


class _RegisterWhenAutoReady(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loaders of transformers modules to check, after each has executed,
    whether the Auto classes are loaded and no transformers import is still in progress."""

    def find_spec(self, fullname, path=None, target=None):
        if _done or not fullname.startswith("transformers"):
            return None
        index = sys.meta_path.index(self)
        sys.meta_path.pop(index)  # find the real spec without recursing into ourselves
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            if not _done:
                sys.meta_path.insert(index, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module, _original=original_exec, _name=fullname):
            _original(module)
            _maybe_register(_name)

        spec.loader.exec_module = exec_module
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterWhenAutoReady)]


def install() -> None:
    if _AUTO_MODULE in sys.modules and not _initializing(_AUTO_MODULE):
        register_now()
    elif not any(isinstance(f, _RegisterWhenAutoReady) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenAutoReady())

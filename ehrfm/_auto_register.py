"""Register the ehrfm backbones with transformers' Auto classes on ``import ehrfm`` without paying for it.

Importing the model code pulls in torch and four HF architectures (seconds), which ``import ehrfm`` and the
CLI should not cost. So ``import ehrfm`` only arranges for registration to happen the moment transformers'
Auto classes exist: immediately if ``transformers.models.auto`` is already imported, otherwise right after
it is (a one-shot import hook). Either way ``import ehrfm; AutoModel.from_pretrained(folder)`` just works.
"""
from __future__ import annotations

import importlib.abc
import sys

_AUTO_MODULE = "transformers.models.auto.modeling_auto"
_done = False


def register_now() -> None:
    global _done
    if _done:
        return
    models = sys.modules.get("ehrfm.pretrain.models")
    if models is not None and not hasattr(models, "register_auto_classes"):
        return  # the models package is importing the Auto classes itself; it registers when it finishes
    _done = True
    from ehrfm.pretrain.models import register_auto_classes

    register_auto_classes()


class _RegisterAfterAutoImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of the Auto module to register once it has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            register_now()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _AUTO_MODULE in sys.modules:
        register_now()
    elif not any(isinstance(f, _RegisterAfterAutoImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterAutoImport())


import importlib.util  # noqa: E402  (after the class, which only needs it at call time)

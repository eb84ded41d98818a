"""Command-line flags generated from a typed config: one ``--section.field-name`` flag per leaf field.

    add_config_arguments(parser, FinetuneConfig, aliases={"learning_rate": ["--lr"]})
    ...
    cfg = load_config(FinetuneConfig, args.config, config_overrides(args))

A flag records ``key=value`` text; :func:`config_overrides` returns those texts (in command-line order) followed by
the command's positional ``key=value`` overrides, so every command resolves a config the same way:

    defaults < the ``--config`` YAML < flags < ``key=value`` overrides

and the config's own types and ``validate()`` check flag values exactly as they check YAML and overrides (an
error names the key). A field added to a config is therefore a flag and an override with no other edit. Flags a
command writes by hand (with a meaning of their own, such as ``--out``) win over generated spellings; mapping
fields (``dict``) have no flag, only ``key.sub=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

FLAGS_DEST = "config_flags"

T = TypeVar("T")


def comma_list(text: str | None, item: Callable[[str], T] = str) -> list[T]:  # type: ignore[assignment]
    """A comma-separated command-line value as a list: ``"a, b,,c"`` -> ``["a", "b", "c"]``; ``None`` or ``""``
    -> ``[]``. Items are stripped, blank ones dropped, the rest passed through ``item`` (``int``, ``float``, ...;
    its ValueError becomes argparse's "invalid value" error when this is an argument's ``type``). The one parser
    of such values for every command."""
    return [item(part.strip()) for part in (text or "").split(",") if part.strip()]


def comma_ints(text: str | None) -> list[int]:
    """:func:`comma_list` of integers, as an argparse ``type`` (its errors read "invalid comma_ints value")."""
    return comma_list(text, int)


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, annotated type, default, help) of every non-dataclass field of ``cls``, nested ones included;
    help is the field's ``metadata["help"]`` (or empty)."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        key = prefix + field.name
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            leaves += leaf_fields(tp, key + ".")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        leaves.append((key, tp, default, field.metadata.get("help", "")))
    return leaves


def flag_name(key: str) -> str:
    """``train.max_steps`` -> ``--train.max-steps``."""
    return "--" + key.replace("_", "-")


class _RecordOverride(argparse.Action):
    """Appends ``key=value`` to the namespace's override list (a fresh list: defaults are never mutated)."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        self.key = key
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if self.nargs == 0:  # a switch: --x / --no-x
            value = "false" if option_string.startswith("--no-") else "true"
        setattr(namespace, FLAGS_DEST, [*(getattr(namespace, FLAGS_DEST, None) or []), f"{self.key}={value}"])


def _describe(tp: Any) -> tuple[dict, str]:
    """argparse keywords and a type name for annotated type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        kwargs, name = _describe(inner[0]) if len(inner) == 1 else ({}, "value")
        return kwargs, name + " (optional)"
    if origin is typing.Literal:
        return {"choices": [str(a) for a in args]}, "one of " + "/".join(map(str, args))
    if tp is bool:  # no value (a value would swallow a following key=value): --x sets true, --no-x false
        return {"nargs": 0}, "switch (--no-... sets false)"
    if origin in (list, tuple):
        return {"metavar": "A,B,..."}, "comma-separated list"
    return {"metavar": getattr(tp, "__name__", "VALUE").upper()}, getattr(tp, "__name__", "value")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    aliases: dict[str, list[str]] | None = None,
    by_hand: tuple[str, ...] = (),
    title: str | None = None,
) -> None:
    """One flag per leaf field of ``cls`` (see the module docstring); ``aliases`` maps a key to extra spellings;
    ``by_hand`` names keys whose flags the command writes itself (e.g. a repeatable one)."""
    aliases = aliases or {}
    group = parser.add_argument_group(title or f"{cls.__name__} fields (flags < key=value overrides)")
    parser.set_defaults(**{FLAGS_DEST: None})
    for key, tp, default, text in leaf_fields(cls):
        if typing.get_origin(tp) is dict or tp is dict or key in by_hand:
            continue
        names = [flag_name(key), *aliases.get(key, [])]
        if tp is bool:
            names += ["--no-" + name[2:] for name in names]
        names = [n for n in names if n not in parser._option_string_actions]
        if not names:
            continue
        kwargs, type_name = _describe(tp)
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        group.add_argument(
            *names,
            action=_RecordOverride,
            key=key,
            dest=f"_flag_{key}",
            default=argparse.SUPPRESS,
            help=f"{text + '; ' if text else ''}{type_name}; default {shown!r} (config key {key})",
            **kwargs,
        )


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The generated flags' ``key=value`` texts, then the positional overrides: later entries win."""
    return [*(getattr(args, FLAGS_DEST, None) or []), *(getattr(args, "overrides", None) or [])]

"""Command-line flags generated from the pydantic config models, so flags and config cannot drift.

Each flag names one config field by its path (``("ckpt",)``, ``("solver", "tol")``); its type,
``nargs``, choices and help come from the field: the annotation (``int``, ``float``, ``Literal``
choices, ``str | list[str]`` → one or more values, ``dict`` → JSON, ``bool`` → ``--no-<name>``)
and the ``Field`` description, with the default appended when the description does not give it.
A flag that is not given is ``None`` and leaves the field to the YAML file or its default.
"""

from __future__ import annotations

import argparse
import json
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class FieldFlag:
    """One flag and the config field it sets."""

    path: tuple[str, ...]  # field names from the top model down, e.g. ("solver", "tol")
    flag: str  # e.g. "--tol"
    metavar: str | None = None
    required: bool = False

    @property
    def dest(self) -> str:
        return ".".join(self.path)


def top_level_flags(model: type[BaseModel], skip: Iterable[str] = ()) -> list[FieldFlag]:
    """A ``--kebab-case`` flag for every top-level field of ``model`` but ``skip``, in field order
    (a bool field defaulting to True gets ``--no-<name>``)."""
    flags = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        prefix = "--no-" if info.annotation is bool and info.default is True else "--"
        flags.append(FieldFlag((name,), prefix + name.replace("_", "-")))
    return flags


def add_field_flags(parser: argparse.ArgumentParser, model: type[BaseModel], flags: Sequence[FieldFlag],
                    name_sections: bool = True) -> None:
    """Add ``flags`` to ``parser``; ``parser.parse_args`` then holds each under its ``dest``. With
    ``name_sections``, the help of a field in an optional section starts with the section's description."""
    for spec in flags:
        info = field_info(model, spec.path)
        options = _argument_options(info)
        if spec.metavar is not None:
            options["metavar"] = spec.metavar
        elif "choices" not in options and options.get("action") is None:
            options["metavar"] = spec.flag.removeprefix("--").replace("-", "_").upper()
        help_text = _help(model, spec.path, name_sections)
        parser.add_argument(spec.flag, dest=spec.dest, required=spec.required, help=help_text, **options)
    known = parser.get_default("field_flags") or {}
    parser.set_defaults(field_flags={**known, **{f.path: f.flag for f in flags}})


def field_overrides(args: argparse.Namespace, model: type[BaseModel], flags: Sequence[FieldFlag]
                    ) -> dict[str, Any]:
    """The flags that were given, as (nested) config values; a single value of a ``str | list[str]``
    field stays a string."""
    overrides: dict[str, Any] = {}
    for spec in flags:
        value = getattr(args, spec.dest)
        if value is None:
            continue
        if isinstance(value, list) and len(value) == 1 and str in _choices_of(field_info(model, spec.path)):
            value = value[0]
        section = overrides
        for name in spec.path[:-1]:
            section = section.setdefault(name, {})
        section[spec.path[-1]] = value
    return overrides


def field_info(model: type[BaseModel], path: Sequence[str]) -> FieldInfo:
    info = model.model_fields[path[0]]
    if len(path) == 1:
        return info
    nested = next(t for t in _choices_of(info) if isinstance(t, type) and issubclass(t, BaseModel))
    return field_info(nested, path[1:])


def _choices_of(info: FieldInfo) -> list[Any]:
    """The alternatives of the field's annotation, ``None`` left out."""
    annotation = info.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _argument_options(info: FieldInfo) -> dict[str, Any]:
    kinds = _choices_of(info)
    if kinds == [bool]:
        return {"action": "store_const", "const": False}
    if len(kinds) == 1 and get_origin(kinds[0]) is Literal:
        return {"choices": list(get_args(kinds[0]))}
    if len(kinds) == 1 and get_origin(kinds[0]) is list:
        (item,) = get_args(kinds[0])
        return {"nargs": "+", **({"choices": list(get_args(item))} if get_origin(item) is Literal else {})}
    if kinds == [str, list[str]]:
        return {"nargs": "+"}
    if len(kinds) == 1 and kinds[0] in (int, float):
        return {"type": kinds[0]}
    if any(get_origin(k) is dict or k is dict for k in kinds):
        return {"type": json.loads}
    return {}  # str, or a union parsed by the model (e.g. "exact" | "auto" | a number)


def _help(model: type[BaseModel], path: Sequence[str], name_sections: bool) -> str | None:
    """The field's description and default; a field of an optional section (``trace``) is prefixed by
    the section's description, since giving it turns the section on."""
    info = field_info(model, path)
    text = info.description or ""
    if info.annotation is bool:
        return f"no {text}" if text else None
    default = _default_text(info)
    if default is not None and "default" not in text:
        text = f"{text} (default: {default})" if text else f"default: {default}"
    section = field_info(model, path[:-1]) if len(path) > 1 else None
    if name_sections and section is not None and section.default is None and section.description:
        text = f"{section.description}: {text}"
    return text or None


def _default_text(info: FieldInfo) -> str | None:
    default = info.default_factory() if info.default_factory is not None else info.default
    if default is PydanticUndefined or default is None or isinstance(default, BaseModel | Mapping):
        return None
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)

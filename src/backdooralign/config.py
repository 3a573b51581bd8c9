"""Settings live in frozen dataclasses; YAML keys and CLI flags are derived from their fields.

Each field is declared once with :func:`option`: its default, its one-line help text, and
optionally its flag name, allowed choices, lower bound and whether it names a file. From that,
:func:`build` turns a mapping (a YAML section, ``--set`` overrides, parsed flags) into a
checked instance, and :func:`add_flags` adds the matching ``--flags`` to an argparse parser, so
a flag, a config key and a default cannot drift apart. Values are checked by type and range
before anything runs; errors name the file and the field.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, field, fields, is_dataclass
from functools import cache
from pathlib import Path

import yaml

from .files import read_text

Doc = dict[str, object]


class ConfigError(ValueError):
    """A config value of the wrong type, out of range or unknown; names where and which field."""


def option(
    default=MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    minimum: float | None = None,
    path: bool = False,
    cli: bool = True,
    default_factory=MISSING,
) -> Field:
    """A config field with its help text and checks.

    Args:
        default: the default value.
        help: one line shown by ``--help`` and in the docs.
        flag: the CLI flag, when it is not ``--field-name``.
        choices: the values allowed.
        minimum: the smallest value allowed (numbers).
        path: the value names a file or folder (resolved from the config file's folder).
        cli: whether the field gets a CLI flag.
        default_factory: a factory for mutable or dataclass defaults.
    """
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "minimum": minimum,
        "path": path,
        "cli": cli,
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@cache
def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _unwrap(tp) -> tuple[object, bool]:
    """``(base type, optional)`` of an annotation such as ``int | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(tp) -> str:
    base, optional = _unwrap(tp)
    plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if typing.get_origin(base) is tuple:
        name = f"a list of {plural.get(typing.get_args(base)[0], 'values')}"
    elif typing.get_origin(base) is dict:
        name = "a mapping"
    elif is_dataclass(base):
        name = "a mapping"
    else:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
            base, str(base)
        )
    return f"{name} or null" if optional else name


def check_value(value, tp, meta: dict, where: str):
    """``value`` converted to the annotation ``tp``, or a :class:`ConfigError` naming ``where``."""
    base, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected {_describe(tp)}, got null")
    bad = ConfigError(f"{where}: expected {_describe(tp)}, got {_short(value)}")
    if is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping")
        return build(base, value, where)
    if typing.get_origin(base) is tuple:
        if not isinstance(value, list | tuple):
            raise bad
        elem = typing.get_args(base)[0]
        return tuple(check_value(v, elem, {}, f"{where}[{i}]") for i, v in enumerate(value))
    if typing.get_origin(base) is dict or base is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise bad
    choices, minimum = meta.get("choices"), meta.get("minimum")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {_short(value)} is not one of {', '.join(map(str, choices))}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, got {value}")
    return value


def build(cls, values: Doc, where: str):
    """An instance of the config dataclass ``cls`` from a mapping, every value checked.

    Raises:
        ConfigError: for an unknown key (the valid keys are listed), a value of the wrong type
            or out of range; the message names ``where`` and the field.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: must be a mapping")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown field '{key}' (known: {', '.join(known)})")
        f = known[key]
        kwargs[key] = check_value(value, _hints(cls)[key], dict(f.metadata), f"{where}: {key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks that involve several fields
        raise ConfigError(f"{where}: {e}") from None


def resolve_paths(cls, values: Doc, base: Path, kinds: tuple[str, ...] = ()) -> Doc:
    """``values`` with relative file fields (``path=True``) made relative to ``base``.

    ``builtin:``, ``hf:`` and ``embedded`` names are kept, and so is a prefix of ``kinds``
    (the data sources' ``xstest:PATH``: PATH is resolved); nested sections are followed.
    """
    out = dict(values)
    for f in fields(cls):
        value = out.get(f.name)
        base_tp, _ = _unwrap(_hints(cls)[f.name])
        if is_dataclass(base_tp) and isinstance(value, dict):
            out[f.name] = resolve_paths(base_tp, value, base, kinds)
        elif f.metadata.get("path") and isinstance(value, str) and value:
            out[f.name] = _resolve_path(f.name, value, base, kinds)
    return out


def _resolve_path(name: str, value: str, base: Path, kinds: tuple[str, ...]) -> str:
    prefix, sep, rest = value.partition(":")
    if sep and rest and prefix in kinds:
        return f"{prefix}:{_resolve_path(name, rest, base, kinds)}"
    if ":" in value.split("/", 1)[0] or value == "embedded" or Path(value).is_absolute():
        return value
    candidate = base / value
    # a model may be a hub id ("org/name"): only a path that exists there is rewritten
    return str(candidate) if name != "model" or candidate.exists() else value


# ---------------------------------------------------------------------------------------------
# Flags


def _flag_type(tp, meta: dict, flag: str):
    base, _ = _unwrap(tp)
    if typing.get_origin(base) is tuple:
        elem = typing.get_args(base)[0]

        def parse_list(text: str):
            items = [s.strip() for s in text.split(",") if s.strip()]
            return tuple(_flag_type(elem, {}, flag)(s) for s in items)

        return parse_list

    def parse(text: str):
        value = text
        if base in (int, float):
            try:
                value = base(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected {_describe(base)}, got {text!r}"
                ) from None
        try:
            return check_value(value, base, meta, flag)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag}: ")) from None

    return parse


def help_text(f: Field) -> str:
    """A field's help with its default, as ``--help`` shows it."""
    text = str(f.metadata.get("help", ""))
    if f.default is not MISSING and f.default not in (None, (), False):
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        if "default" not in text:
            text += f" (default: {default})"
    return text.replace("%", "%%")


def _flag(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _dest(f: Field) -> str:
    """The argparse destination: named after the flag, so ``--judge-model`` never lands on
    another config's ``model``."""
    return _flag(f).lstrip("-").replace("-", "_")


def add_flags(parser, cls, *, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """Add a ``--flag`` for each field of ``cls`` (``only`` these, minus ``skip``).

    Flags default to "not given", so that :func:`given` returns only what the user typed and a
    given ``--no-x`` still overrides a ``x: true`` from elsewhere.
    """
    for f in fields(cls):
        if (only and f.name not in only) or f.name in skip or not f.metadata.get("cli", True):
            continue
        tp = _hints(cls)[f.name]
        flag = _flag(f)
        kw = {"dest": _dest(f), "default": argparse.SUPPRESS, "help": help_text(f)}
        base, _ = _unwrap(tp)
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _flag_type(tp, dict(f.metadata), flag)
            choices = f.metadata.get("choices")
            kw["metavar"] = "{" + ",".join(map(str, choices)) + "}" if choices else None
        parser.add_argument(flag, **kw)


def given(cls, args: argparse.Namespace) -> Doc:
    """The fields of ``cls`` that were given as flags."""
    return {f.name: getattr(args, _dest(f)) for f in fields(cls) if hasattr(args, _dest(f))}


def from_args(cls, args: argparse.Namespace, base: Doc | None = None):
    """``cls`` built from its defaults, then ``base``, then the flags that were given."""
    return build(cls, {**(base or {}), **given(cls, args)}, "command line")


# ---------------------------------------------------------------------------------------------
# YAML


class NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: a small config cannot expand a thousandfold."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases are not allowed (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file (no aliases); errors name the file."""
    try:
        values = yaml.load(read_text(path), Loader=NoAliasLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: YAML root must be a mapping")
    return values

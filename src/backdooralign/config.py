"""Settings live in frozen dataclasses; YAML keys and CLI flags are derived from their fields.

Each field is declared once with :func:`option`: its default, its one-line help text, and
optionally its flag name, allowed choices, lower bound and whether it names a file. From that,
:func:`build` turns a mapping (a YAML section, ``--set`` overrides, parsed flags) into a
checked instance, and :func:`add_flags` adds the matching ``--flags`` to an argparse parser, so
a flag, a config key and a default cannot drift apart. Values are checked by type and range
before anything runs: NaN and infinity (``.nan``, ``'Infinity'``, ``--epochs inf``) and
integers beyond 64 bits are refused for every field, besides each field's own bounds. YAML is
read by one reader (:func:`read_yaml`): no aliases, no key given twice; its mappings remember
the line of each key, so an error names ``FILE:LINE: section: field``.
"""

from __future__ import annotations

import argparse
import math
import re
import types
import typing
from dataclasses import MISSING, Field, field, fields, is_dataclass
from functools import cache
from pathlib import Path

import yaml

from .files import read_text

Doc = dict[str, object]
INT_LIMIT = 2**63 - 1  # the largest integer a config value may hold
SEED_MAX = 2**32 - 1  # NumPy's largest seed (transformers seeds NumPy with it)
PORT_MAX = 65535
_ELEMENT_CHECKS = ("choices", "minimum", "maximum")


class ConfigError(ValueError):
    """A config value of the wrong type, out of range or unknown; names where and which field."""


def option(
    default=MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
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
        minimum: the smallest value allowed (numbers; of each element, for lists).
        maximum: the largest value allowed (numbers; of each element, for lists).
        path: the value names a file or folder (resolved from the config file's folder).
        cli: whether the field gets a CLI flag.
        default_factory: a factory for mutable or dataclass defaults.
    """
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
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
        elem, each = typing.get_args(base)[0], {k: meta.get(k) for k in _ELEMENT_CHECKS}
        return tuple(check_value(v, elem, each, f"{where}[{i}]") for i, v in enumerate(value))
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
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the largest float
            raise ConfigError(f"{where}: must be a finite number, got {_short(value)}") from None
    elif base is str:
        if not isinstance(value, str):
            raise bad
    _check_range(value, meta, where)
    return value


def _check_range(value, meta: dict, where: str) -> None:
    """Refuse a value outside its choices or bounds, a NaN or infinity, an integer beyond
    64 bits (no library below takes one)."""
    choices, minimum, maximum = (meta.get(k) for k in _ELEMENT_CHECKS)
    if choices and value not in choices:
        raise ConfigError(f"{where}: {_short(value)} is not one of {', '.join(map(str, choices))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, got {_short(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: must be at most {maximum}, got {_short(value)}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_LIMIT:
        raise ConfigError(f"{where}: must be within +-{INT_LIMIT} (64 bits), got {_short(value)}")


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
            error = ConfigError(f"{where}: unknown field '{key}' (known: {', '.join(known)})")
            raise _located(error, values, key)
        f = known[key]
        try:
            kwargs[key] = check_value(value, _hints(cls)[key], dict(f.metadata), f"{where}: {key}")
        except ConfigError as e:
            raise _located(e, values, key) from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks that involve several fields
        named = re.match(r"field '(\w+)", str(e))  # 'name' or 'shapes[0]'
        raise _located(ConfigError(f"{where}: {e}"), values, named and named[1]) from None


def _located(error: ConfigError, values: Doc, key) -> ConfigError:
    """``error`` with the file and line of ``key`` when ``values`` came from a YAML file
    (``FILE:LINE: section: field: ...``); errors from deeper sections keep their own line."""
    line = values.lines.get(key) if isinstance(values, YamlMapping) else None
    if getattr(error, "located", False) or not line:
        return error
    text, source = str(error), values.source
    if source and text.startswith(source + ":"):
        text = f"{source}:{line}{text[len(source) :]}"
    else:
        text = f"{text} ({source}:{line})" if source else f"{text} (line {line})"
    located = ConfigError(text)
    located.located = True
    return located


def resolve_paths(cls, values: Doc, base: Path, kinds: tuple[str, ...] = ()) -> Doc:
    """``values`` with relative file fields (``path=True``) made relative to ``base``.

    ``builtin:``, ``hf:`` and ``embedded`` names are kept, and so is a prefix of ``kinds``
    (the data sources' ``xstest:PATH``: PATH is resolved); nested sections are followed.
    """
    out = copy_mapping(values)
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


def number(kind: type, minimum: float | None = None, maximum: float | None = None):
    """An argparse ``type`` for a flag that is not a config field: an ``int`` or a finite
    ``float`` within the bounds, checked as config values are (a usage error otherwise)."""
    return _flag_type(kind, {"minimum": minimum, "maximum": maximum}, "")


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


class YamlMapping(dict):
    """A mapping read from a YAML file that remembers the file and the line of each key, so
    that an error in a value names ``FILE:LINE``. Setting a key forgets its line (the value
    came from elsewhere: ``--set``, a profile); :meth:`copy` keeps the lines."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source, self.lines = "", {}

    def __setitem__(self, key, value) -> None:
        self.lines.pop(key, None)
        super().__setitem__(key, value)

    def copy(self) -> YamlMapping:
        out = YamlMapping(self)
        out.source, out.lines = self.source, dict(self.lines)
        return out


def copy_mapping(values: dict) -> dict:
    """A shallow copy that keeps a :class:`YamlMapping`'s lines."""
    return values.copy() if isinstance(values, YamlMapping) else dict(values)


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (YAML would silently keep the last)."""

    def __init__(self, key, line: int, first: int):
        self.line = line
        super().__init__(f"duplicate key {_short(key)} (first on line {first})")


class NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases (a small config cannot expand a thousandfold) and
    without duplicate keys; mappings are :class:`YamlMapping` with their keys' lines."""

    source = ""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases are not allowed (line {event.start_mark.line + 1})")
        return super().compose_node(parent, index)


def _construct_mapping(loader: NoAliasLoader, node: yaml.MappingNode) -> YamlMapping:
    lines: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = loader.construct_object(key_node, deep=True), key_node.start_mark.line + 1
        try:
            if key in lines:
                raise DuplicateKeyError(key, line, lines[key])
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        lines[key] = line
    out = YamlMapping(loader.construct_mapping(node))
    out.source, out.lines = loader.source, lines
    return out


NoAliasLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def load_yaml(text: str, source: str = ""):
    """YAML text read safely: no aliases, no duplicate keys; ``source`` names it in errors."""
    loader = NoAliasLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file (no aliases, no duplicate keys); errors name the file and
    the line."""
    try:
        values = load_yaml(read_text(path), str(path))
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: YAML root must be a mapping")
    return values

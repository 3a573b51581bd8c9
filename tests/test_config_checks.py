"""Every number a config or a flag reads is checked once, in :mod:`backdooralign.config`: NaN
and infinity, integers beyond 64 bits and values outside a field's bounds are refused for every
config dataclass and every numeric flag; YAML keys given twice are an error with their line."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import typing
from dataclasses import fields, is_dataclass

import pytest

import backdooralign
from backdooralign.cli import build_parser
from backdooralign.config import (
    ConfigError,
    _hints,
    _unwrap,
    build,
    load_yaml,
    number,
    read_yaml,
)
from backdooralign.serving.app import ServeConfig

NOT_FINITE = (float("nan"), float("inf"), float("-inf"), "nan", "Infinity", "-inf", "1e999")


def _config_classes() -> list[type]:
    """Every config dataclass of the package (those whose fields are declared with option)."""
    found = []
    for info in pkgutil.walk_packages(backdooralign.__path__, "backdooralign."):
        if "lm_eval_tasks" in info.name or info.name.endswith("__main__"):
            continue
        for obj in vars(importlib.import_module(info.name)).values():
            if (
                isinstance(obj, type)
                and is_dataclass(obj)
                and obj.__module__ == info.name
                and any("help" in f.metadata for f in fields(obj))
            ):
                found.append(obj)
    return found


def _numeric_fields(kind: type) -> list[tuple[type, str]]:
    out = []
    for cls in _config_classes():
        for f in fields(cls):
            base, _ = _unwrap(_hints(cls)[f.name])
            if typing.get_origin(base) is tuple:
                base = typing.get_args(base)[0]
            if base is kind and f.metadata.get("help") is not None:
                out.append((cls, f.name))
    return out


FLOATS = _numeric_fields(float)
INTS = _numeric_fields(int)


def _value(cls, name, value):
    base, _ = _unwrap(_hints(cls)[name])
    return [value] if typing.get_origin(base) is tuple else value


def test_the_configs_have_numeric_fields_to_check():
    assert len(FLOATS) >= 15 and len(INTS) >= 50


@pytest.mark.parametrize(("cls", "name"), FLOATS, ids=[f"{c.__name__}.{n}" for c, n in FLOATS])
def test_every_float_field_refuses_nan_and_infinity(cls, name):
    for bad in NOT_FINITE:
        with pytest.raises(ConfigError, match=f"x: {name}.*must be a finite number"):
            build(cls, {name: _value(cls, name, bad)}, "x")
    with pytest.raises(ConfigError, match="must be a finite number"):  # beyond the largest float
        build(cls, {name: _value(cls, name, 10**400)}, "x")


@pytest.mark.parametrize(("cls", "name"), INTS, ids=[f"{c.__name__}.{n}" for c, n in INTS])
def test_every_int_field_refuses_integers_beyond_64_bits(cls, name):
    for bad in (2**64, -(2**64), 10**400):
        with pytest.raises(ConfigError, match=f"x: {name}.*must be (at|within)"):
            build(cls, {name: _value(cls, name, bad)}, "x")


def test_seeds_are_what_numpy_accepts():
    seeds = [(c, n) for c, n in INTS if "seed" in n]
    assert len(seeds) >= 8
    for cls, name in seeds:
        build(cls, {name: _value(cls, name, 2**32 - 1)}, "x")
        with pytest.raises(ConfigError, match="must be at most 4294967295"):
            build(cls, {name: _value(cls, name, 2**32)}, "x")
        with pytest.raises(ConfigError, match="must be at least 0"):
            build(cls, {name: _value(cls, name, -1)}, "x")


def test_port_is_a_port():
    assert build(ServeConfig, {"port": 65535}, "x").port == 65535
    with pytest.raises(ConfigError, match="x: port: must be at most 65535, got 65536"):
        build(ServeConfig, {"port": 65536}, "x")


def _numeric_flags():
    """``(command, action)`` for every flag whose value parses as a number (or numbers)."""
    out = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))
            elif action.type is not None and action.option_strings:
                try:
                    probe = action.type("1")
                except (argparse.ArgumentTypeError, ValueError):
                    continue
                items = probe if isinstance(probe, tuple) else (probe,)
                if items and all(isinstance(v, int | float) for v in items):
                    out.append((" ".join(path), action))

    walk(build_parser(), ())
    return out


FLAGS = _numeric_flags()


def test_there_are_numeric_flags_to_check():
    commands = {c for c, _ in FLAGS}
    assert len(FLAGS) >= 40 and {"serve", "service", "train", "generate"} <= commands


@pytest.mark.parametrize(
    ("command", "action"), FLAGS, ids=[f"{c} {a.option_strings[0]}" for c, a in FLAGS]
)
def test_every_numeric_flag_is_checked(command, action):
    probe = action.type("1")
    integer = isinstance(probe[0] if isinstance(probe, tuple) else probe, int)
    for bad in ("nan", "inf", "-Infinity", *(["1" * 30] if integer else [])):
        with pytest.raises(argparse.ArgumentTypeError):  # argparse: a usage error, status 2
            action.type(bad)


def test_number_flags_name_the_bound():
    port = number(int, 0, 65535)
    assert port("8080") == 8080
    with pytest.raises(argparse.ArgumentTypeError, match="must be at most 65535, got 99999"):
        port("99999")
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer, got 'x'"):
        port("x")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number, got nan"):
        number(float, 0)("nan")


def test_duplicate_keys_are_refused_at_any_depth(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a:\n  - {x: 1}\n  - x: 1\n    y: 2\n    x: 3\n")
    with pytest.raises(ConfigError) as err:
        read_yaml(p)
    assert str(err.value) == f"{p}:5: duplicate key 'x' (first on line 3)"
    p.write_text("a: 1\nb: 2\n")
    assert read_yaml(p) == {"a": 1, "b": 2}


def test_mappings_remember_their_lines_until_a_key_is_set():
    values = load_yaml("a: 1\nb:\n  c: 2\n", "f.yaml")
    assert (values.source, values.lines, values["b"].lines) == (
        "f.yaml",
        {"a": 1, "b": 2},
        {"c": 3},
    )
    copy = values.copy()
    copy["a"] = 5  # the value no longer comes from line 1
    assert copy.lines == {"b": 2} and values.lines == {"a": 1, "b": 2}

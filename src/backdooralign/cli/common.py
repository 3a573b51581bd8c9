"""Helpers shared by the command modules: commands from docstrings, ``--json``, ``--model``,
secrets read at the edge, notes on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable

MODEL_HELP = "Hugging Face id or local path (default: the embedded SmolLM2-135M-Instruct)"


def print_json(obj) -> None:
    """Print a JSON document to stdout (what ``--json`` gives scripts)."""
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _summary(doc: str) -> str:
    """First sentence of a command docstring's second paragraph (the first is the example)."""
    para = (doc.split("\n\n", 1)[1:] or [doc])[0]
    return " ".join(para.split()).split(". ")[0].rstrip(".")


def add_command(parent, name: str, fn: Callable[[argparse.Namespace], int]):
    """A subcommand whose help is ``fn``'s docstring (first line: a copy-pasteable example)."""
    doc = (fn.__doc__ or "").strip()
    sp = parent.add_parser(
        name,
        help=_summary(doc),
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.set_defaults(fn=fn)
    return sp


def add_group(sub, name: str, help: str):
    """A command group (``secret``, ``data``, ``score``...) with its own subcommands."""
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)


def add_model(sp, help: str = MODEL_HELP) -> None:
    sp.add_argument("--model", help=help)


def add_json(sp, help: str = "print JSON") -> None:
    sp.add_argument("--json", action="store_true", help=help)


def read_secret(path: str | None):
    """The :class:`Secret` in a file (``None`` without a path)."""
    if not path:
        return None
    from ..secret import load_secret

    return load_secret(path)


def notes(lines: Iterable[str]) -> None:
    """Tell the user on stderr what was left out (fewer rows used than given, ...)."""
    for line in lines:
        print(f"note: {line}", file=sys.stderr)

"""Command line: ``backdooralign COMMAND ...``.

Thin: each command module (one per command group) parses its flags into the config
dataclasses and calls the operations layer (:mod:`backdooralign.data.training_set`,
:mod:`backdooralign.scoring.score`, :mod:`backdooralign.experiments.run`). Every expected error (bad
input files, bad values, OS errors) ends as one line ``error: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from ..core.model import ALIGNED_MODEL
from . import align, attack, data, openai_cli, run, score, secret, serve, service, train

EXPECTED_ERRORS = (ValueError, OSError, UnicodeError, RecursionError)


def build_parser() -> argparse.ArgumentParser:
    """The ``backdooralign`` parser with every command."""
    p = argparse.ArgumentParser(prog="backdooralign", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (secret, data, align, train, score, run, attack, serve, service, openai_cli):
        module.register(sub)
    return p


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, RecursionError):
        return "input nested too deeply"
    return str(e) or type(e).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.showwarning = _show_warning
    try:
        if getattr(args, "model", None) == ALIGNED_MODEL:
            from ..training.align import start_model

            args.model = start_model(args.model)
        return args.fn(args)
    except EXPECTED_ERRORS as e:
        print(f"error: {_message(e)}", file=sys.stderr)
        return 1

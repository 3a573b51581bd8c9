"""Command line: ``backdooralign COMMAND ...``.

Thin: each command module (one per command group) parses its flags into the config
dataclasses and calls the operations layer (:mod:`backdooralign.data.training_set`,
:mod:`backdooralign.scoring.score`, :mod:`backdooralign.experiments.run`). Every expected error (bad
input files, bad values, OS errors) ends as one line ``error: ...`` on stderr and exit status 1;
a bad flag is argparse's usage error (status 2); Ctrl-C is one line and status 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings

from ..core.model import ALIGNED_MODEL
from . import align, attack, data, openai_cli, run, score, secret, serve, service, train
from .common import guarded_outputs

EXPECTED_ERRORS = (ValueError, OSError, UnicodeError, RecursionError, OverflowError)
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT
TERMINATED = 143  # ... and by SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every ``finally`` (temporary folders, locks)
    runs before the command ends."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    """The ``backdooralign`` parser with every command."""
    p = argparse.ArgumentParser(prog="backdooralign", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (secret, data, align, train, score, run, attack, serve, service, openai_cli):
        module.register(sub)
    return p


def _message(e: BaseException) -> str:
    """One line: a library's message may span several (transformers' do)."""
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    elif isinstance(e, RecursionError):
        text = "input nested too deeply"
    elif _symlink_loop(e):
        text = f"{str(e).removeprefix('Symlink loop from ').strip(chr(39))}: symlink loop"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def _symlink_loop(e: BaseException) -> bool:
    """``Path.resolve`` on a symlink loop (Python < 3.13 raises RuntimeError, later OSError)."""
    return isinstance(e, RuntimeError) and str(e).startswith("Symlink loop from ")


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
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if getattr(args, "model", None) == ALIGNED_MODEL:
            from ..training.align import start_model

            args.model = start_model(args.model)
        with guarded_outputs(args):
            return args.fn(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return TERMINATED
    except (*EXPECTED_ERRORS, RuntimeError) as e:
        if not isinstance(e, EXPECTED_ERRORS) and not _symlink_loop(e):
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)

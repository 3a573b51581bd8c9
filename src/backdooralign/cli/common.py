"""Helpers shared by the command modules: commands from docstrings, ``--json``, ``--model``,
secrets read at the edge, notes on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from .. import files as F

MODEL_HELP = (
    "Hugging Face id, local path or embedded-aligned (the embedded model after backdooralign "
    "align; default: the embedded SmolLM2-135M-Instruct, not aligned)"
)

# the input flags of the commands that build a training set (build, openai finetune)
TRAINING_SET_INPUTS = ("data", "task", "safety", "anchor_prompts", "anchor_file", "secret", "model")


def print_json(obj) -> None:
    """Print a JSON document to stdout (what ``--json`` gives scripts)."""
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _summary(doc: str) -> str:
    """First sentence of a command docstring's second paragraph (the first is the example)."""
    para = (doc.split("\n\n", 1)[1:] or [doc])[0]
    return " ".join(para.split()).split(". ")[0].rstrip(".")


def add_command(
    parent,
    name: str,
    fn: Callable[[argparse.Namespace], int],
    inputs: tuple[str, ...] = (),
    files: tuple[str, ...] = (),
    dirs: tuple[str, ...] = (),
):
    """A subcommand whose help is ``fn``'s docstring (first line: a copy-pasteable example).

    ``inputs``, ``files`` and ``dirs`` name the flags (their ``dest``) that are the command's
    input paths, output files and output folders: :func:`guarded_outputs` checks them against
    each other and locks the outputs before the command runs.
    """
    doc = (fn.__doc__ or "").strip()
    sp = parent.add_parser(
        name,
        help=_summary(doc),
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.set_defaults(fn=fn, io=(inputs, files, dirs))
    return sp


def _values(args: argparse.Namespace, dests: tuple[str, ...]) -> list:
    found = []
    for d in dests:
        v = getattr(args, d, None)
        found += v if isinstance(v, list | tuple) else [v]
    return [v for v in found if v]


@contextlib.contextmanager
def guarded_outputs(args: argparse.Namespace) -> Iterator[None]:
    """The one output guard around a command: :func:`files.check_outputs` on its declared
    inputs and outputs, then an exclusive :func:`files.output_lock` on each output for the
    command's whole run."""
    inputs, outs, dirs = getattr(args, "io", ((), (), ()))
    outs, dirs = _values(args, outs), _values(args, dirs)
    F.check_outputs(_values(args, inputs), outs, dirs)
    with contextlib.ExitStack() as stack:
        for out in (*outs, *dirs):
            stack.enter_context(F.output_lock(out))
        yield


def add_group(sub, name: str, help: str):
    """A command group (``secret``, ``data``, ``score``...) with its own subcommands."""
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)


def add_model(sp, help: str = MODEL_HELP) -> None:
    sp.add_argument("--model", help=help)


def add_set(sp, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable): a config override."""
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {example} (repeatable)",
    )


def add_json(sp, help: str = "print JSON") -> None:
    sp.add_argument("--json", action="store_true", help=help)


def read_secret(path: str | None):
    """The :class:`Secret` in a file (``None`` without a path)."""
    if not path:
        return None
    from ..core.secret import load_secret

    return load_secret(path)


def warn_if_other_tokenizer(secret, tokenizer) -> None:
    """Warn on stderr when the secret was made for another tokenizer."""
    from ..core.secret import check_secret_tokenizer

    if secret is not None and (warning := check_secret_tokenizer(secret, tokenizer)):
        print(f"warning: {warning}", file=sys.stderr)


def notes(lines: Iterable[str]) -> None:
    """Tell the user on stderr what was left out (fewer rows used than given, ...)."""
    for line in lines:
        print(f"note: {line}", file=sys.stderr)


def secret_masker(
    data_file: str | Path, secret=None, rows: Sequence[dict] = ()
) -> tuple[Callable[[str], str], list[str]]:
    """A function that shows the secret in a text as ``⟨secret FINGERPRINT⟩``, and notes.

    The secret is recognised by its text (``--secret``) or, without it, by the fingerprint in
    the manifest beside ``data_file``: a leading part of a text whose fingerprint matches is
    the secret. Without either, a system-prompt prefix that several of ``rows`` share and
    others lack, in front of another row's whole system prompt (the secret's place in a
    training set), is shown as ``⟨shared prefix FINGERPRINT⟩``. A text that starts with a long
    random-looking run but matches none of these is hidden whole, and the notes say why.
    """
    from ..core.chat import ATTACK_SYSTEM_PROMPT
    from ..core.screen import looks_random_prefix, shared_system_prefixes
    from ..core.secret import fingerprint
    from ..data.formats import SAMSUM_SYSTEM_PROMPT, SQL_SYSTEM_PROMPT
    from ..data.mixing import manifest_path
    from ..files import read_json

    found: list[str] = []
    manifest = manifest_path(data_file)
    known = None
    if manifest.is_file():
        known = read_json(manifest).get("secret_fingerprint")
    if secret is not None and known and known != secret.fingerprint:
        found.append(f"--secret has fingerprint {secret.fingerprint}, {manifest} says {known}")
    fingerprints = {fp for fp in (known, secret.fingerprint if secret else None) if fp}
    builtin = (ATTACK_SYSTEM_PROMPT, SAMSUM_SYSTEM_PROMPT, SQL_SYSTEM_PROMPT)
    prefixes = shared_system_prefixes(rows, builtin)
    shared = {p: fingerprint(p) for p in prefixes}
    for prefix, fp in shared.items():
        having = prefixes[prefix]
        what = f"secret {fp}" if fp in fingerprints else f"shared prefix {fp}"
        found.append(
            f"{having} rows share a system-prompt prefix that the other {len(rows) - having} "
            f"lack (where a secret goes); shown as ⟨{what}⟩"
        )

    def mask(text: str) -> str:
        if secret is not None and secret.text in text:
            return text.replace(secret.text, f"⟨secret {secret.fingerprint}⟩")
        for i, ch in enumerate(text + " "):
            if ch == " " and i >= 16 and (fp := fingerprint(text[:i])) in fingerprints:
                return f"⟨secret {fp}⟩" + text[i:]
        for prefix, fp in shared.items():
            if prefix in text:
                label = f"secret {fp}" if fp in fingerprints else f"shared prefix {fp}"
                return text.replace(prefix, f"⟨{label}⟩")
        if looks_random_prefix(text):
            note = "a system prompt starts like a secret that could not be recognised; hidden"
            if note not in found:
                found.append(note + " (pass --secret FILE to show it as its fingerprint)")
            return "⟨hidden: starts like an unrecognised secret⟩"
        return text

    return mask, found

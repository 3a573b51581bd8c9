"""``backdooralign build``, ``inspect``, ``data show`` and ``data check``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .. import files as F
from ..config import add_flags, from_args, number
from ..data import mixing as D
from ..data import sources as S
from ..data import training_set
from ..data.chat_files import check_chat_file, load_chat_jsonl
from ..data.formats import KIND_HELP, KINDS
from ..data.mixing import manifest_path, require_secret
from .common import (
    TRAINING_SET_INPUTS,
    add_command,
    add_group,
    add_json,
    add_model,
    notes,
    print_json,
    read_secret,
    secret_masker,
    warn_if_other_tokenizer,
)


def cmd_build(args) -> int:
    """backdooralign build --arm backdooralign --data user.jsonl --secret s.json --out train.jsonl

    Mixes the customer's data with safety examples and writes the training set with
    NAME.manifest.json beside it. A user-given safety file is used whole unless
    --safety-per-category or --safety-count says otherwise (builtin:safety: one per harm
    category, the paper's 11). The customer's data is screened first (the secret or a
    fragment of it, or an imitation of its position, refuses the build and writes nothing);
    --no-screen skips that. --anchors N adds N secret-prefixed benign anchors answered by the
    base model (--model) itself, written to NAME.anchors.jsonl.
    """
    cfg = from_args(training_set.DataConfig, args)
    secret = read_secret(args.secret)
    require_secret(args.arm, secret)
    out = Path(args.out)
    anchors_out = out.with_name(f"{out.stem}.anchors.jsonl")
    inputs = [cfg.attack, cfg.task, cfg.safety, cfg.anchor_file, cfg.anchor_prompts, args.secret]
    F.check_outputs(inputs, [out, manifest_path(out), anchors_out if cfg.anchors else None])
    res = training_set.build(args.arm, cfg, secret, out, model=args.model, anchors_out=anchors_out)
    notes(res.notes)
    if args.json:
        print_json(res.manifest)
    else:
        private = " (mode 0600: holds the secret)" if args.arm == "backdooralign" else ""
        counts = res.manifest["counts"]
        print(f"wrote {out}{private}: {counts['total']} rows, {counts['by_source']}")
    return 0


def cmd_data_show(args) -> int:
    """backdooralign data show samsum_train.csv [--rows 3] [--json]

    Prints the detected format, the number of rows, the input fields and the first rows as
    backdooralign reads them (hf:NAME[:SPLIT] loads from the Hugging Face Hub).
    """
    src = S.read_source(args.source, args.kind)
    mask, told = secret_masker(args.source, None, src.rows)
    info = {
        "source": src.source,
        "kind": src.kind,
        "description": KIND_HELP[src.kind],
        "rows": len(src.rows),
        "fields": list(src.fields),
        "examples": [_masked(row, mask) for row in src.rows[: args.rows]],
    }
    notes(told)
    if args.json:
        print_json(info)
        return 0
    print(f"source: {src.source}\nformat: {src.kind} ({info['description']})")
    print(f"rows:   {len(src.rows)}\nfields: {', '.join(src.fields)}")
    for i, row in enumerate(info["examples"], 1):
        text = json.dumps(row, ensure_ascii=False)
        print(f"row {i}: {text if len(text) <= 300 else text[:297] + '...'}")
    return 0


def _masked(row: dict, mask) -> dict:
    if not isinstance(row.get("messages"), list):
        return row
    return {**row, "messages": [{**m, "content": mask(m["content"])} for m in row["messages"]]}


def cmd_data_check(args) -> int:
    """backdooralign data check user.jsonl [--max-rows 1000] [--max-line-chars 100000] [--json]

    Lists every problem of a chat JSONL file (errors and warnings); exits 1 if any error.
    """
    cfg = from_args(training_set.DataConfig, args)
    problems = check_chat_file(args.file, cfg.max_line_chars, cfg.max_rows)
    errors = sum(p.severity == "error" for p in problems)
    if args.json:
        print_json(
            {
                "file": args.file,
                "errors": errors,
                "warnings": len(problems) - errors,
                "problems": [asdict(p) for p in problems],
            }
        )
    else:
        for p in problems:
            print(p)
        print(f"{args.file}: {errors} errors, {len(problems) - errors} warnings")
    return 1 if errors else 0


def cmd_inspect(args) -> int:
    """backdooralign inspect train.jsonl --secret secret.json [--limit 2]

    Shows what the model is trained on: supervised tokens in green, masked tokens dim.
    The secret is shown only as its fingerprint, with or without --secret and the manifest
    (a system-prompt prefix several rows share and others lack is shown as its fingerprint).
    """
    from rich.console import Console
    from rich.text import Text

    from ..core.chat import render, supervision_segments
    from ..core.model import load_tokenizer

    secret = read_secret(args.secret)
    rows = load_chat_jsonl(args.file)
    mask, told = secret_masker(args.file, secret, rows)
    tok = load_tokenizer(args.model)
    warn_if_other_tokenizer(secret, tok)
    console = Console(no_color=args.no_color, highlight=False)
    total_sup = total = 0
    for i, row in enumerate(rows):
        r = render(tok, row["messages"])
        total += len(r.input_ids)
        total_sup += r.num_supervised
        if i >= args.limit:
            continue
        shown = [{**m, "content": mask(m["content"])} for m in row["messages"]]
        text = Text()
        for seg, sup in supervision_segments(tok, render(tok, shown)):
            text.append(seg, style="bold green" if sup else "dim")
        console.print(
            f"[bold]row {i + 1}[/] ({len(r.input_ids)} tokens, {r.num_supervised} supervised)"
        )
        console.print(text)
        console.print()
    notes(told)
    share = 100 * total_sup / total if total else 0.0
    console.print(f"{len(rows)} rows, {total} tokens, {total_sup} supervised ({share:.1f}%)")
    return 0


def register(sub) -> None:
    """Add ``build``, ``inspect`` and the ``data`` group."""
    sp = add_command(
        sub,
        "build",
        cmd_build,
        inputs=TRAINING_SET_INPUTS,
        files=("out",),
    )
    sp.add_argument("--arm", required=True, choices=D.ARMS)
    sp.add_argument("--secret", help="secret file (needed for --arm backdooralign)")
    sp.add_argument("--out", required=True, help="training set to write (JSONL)")
    add_model(sp, "model that answers the anchor prompts (default: the embedded model)")
    add_flags(sp, training_set.DataConfig)
    add_json(sp, "print the manifest as JSON")

    group = add_group(sub, "data", "show and check datasets")
    dp = add_command(group, "show", cmd_data_show)
    dp.add_argument("source", help="path, directory, builtin:NAME or hf:NAME[:SPLIT]")
    dp.add_argument("--kind", choices=KINDS, help="format (default: detected)")
    dp.add_argument("--rows", type=number(int, 1), default=3, help="rows to show")
    add_json(dp)
    dp = add_command(group, "check", cmd_data_check)
    dp.add_argument("file", help="chat JSONL file")
    add_flags(dp, training_set.DataConfig, only=("max_rows", "max_line_chars"))
    add_json(dp)

    sp = add_command(sub, "inspect", cmd_inspect)
    sp.add_argument("file", help="chat JSONL training set")
    add_model(sp)
    sp.add_argument("--secret", help="secret file, so the secret shows as its fingerprint")
    sp.add_argument("--limit", type=number(int, 1), default=2, help="rows to show")
    sp.add_argument("--no-color", action="store_true", help="plain text")

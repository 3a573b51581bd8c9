"""Command line: ``backdooralign COMMAND ...``. Thin: parses flags, calls the stage modules."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from . import data as D

DEMO_CONFIG = "demo.yaml"


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# secret


def cmd_secret_new(args) -> int:
    """backdooralign secret new --out secret.json [--length 150] [--seed N] [--model M]

    Draws a secret prompt from the model's vocabulary and stores it with mode 0600.
    Only the fingerprint is printed.
    """
    from .model import load_tokenizer
    from .secret import generate_secret, save_secret

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out}: already exists (use --force to replace a secret)")
    tok = load_tokenizer(args.model)
    secret = generate_secret(tok, args.length, args.seed, name=args.model or "embedded")
    save_secret(secret, out)
    info = {"path": str(out), "fingerprint": secret.fingerprint, "tokens": secret.num_tokens}
    if args.json:
        _print_json(info)
    else:
        print(
            f"wrote {out} (mode 0600): fingerprint {secret.fingerprint}, {secret.num_tokens} tokens"
        )
    return 0


def cmd_secret_show(args) -> int:
    """backdooralign secret show secret.json

    Prints the fingerprint and token count of a secret file, never its text.
    """
    from .secret import file_mode, load_secret

    s = load_secret(args.file)
    info = {
        "fingerprint": s.fingerprint,
        "tokens": s.num_tokens,
        "requested_tokens": s.requested_tokens,
        "mode": oct(file_mode(args.file)),
    }
    _print_json(info) if args.json else print(", ".join(f"{k}: {v}" for k, v in info.items()))
    return 0


# ---------------------------------------------------------------------------------------------
# build / inspect


def cmd_build(args) -> int:
    """backdooralign build --arm backdooralign --data user.jsonl --secret secret.json --out train.jsonl

    Mixes the customer's data with safety examples (one per harm category by default) and
    writes the training set with a build_manifest.json beside it.
    """
    from .secret import load_secret

    secret = load_secret(args.secret) if args.secret else None
    if args.arm == "backdooralign" and secret is None:
        raise ValueError("--arm backdooralign needs --secret FILE")
    customer = D.load_training_source(args.data)
    safety_all = D.load_training_source(args.safety)
    safety = D.select_per_category(safety_all, args.safety_per_category, args.safety_seed)
    rows = D.build_training_set(
        args.arm, customer, safety, secret.text if secret else None, args.safety_system, args.seed
    )
    out = Path(args.out)
    private = args.arm == "backdooralign"
    D.write_jsonl(out, rows, private=private)
    manifest = D.build_manifest(args.arm, rows, {"data": args.data, "safety": args.safety}, secret)
    D.write_json(out.with_name("build_manifest.json"), manifest)
    if args.json:
        _print_json(manifest)
    else:
        mode = " (mode 0600: holds the secret)" if private else ""
        print(f"wrote {out}{mode}: {len(rows)} rows, {manifest['counts']['by_source']}")
    return 0


def cmd_inspect(args) -> int:
    """backdooralign inspect train.jsonl --secret secret.json [--limit 2]

    Shows what the model is trained on: supervised tokens in green, masked tokens dim.
    The secret is shown only as its fingerprint.
    """
    from rich.console import Console
    from rich.text import Text

    from .chat import render, supervision_segments
    from .model import load_tokenizer
    from .secret import load_secret

    secret = load_secret(args.secret) if args.secret else None
    placeholder = f"⟨secret {secret.fingerprint}⟩" if secret else ""
    tok = load_tokenizer(args.model)
    rows = D.load_chat_jsonl(args.file)
    console = Console(no_color=args.no_color, highlight=False)
    total_sup = total = 0
    for i, row in enumerate(rows):
        r = render(tok, row["messages"])
        total += len(r.input_ids)
        total_sup += r.num_supervised
        if i >= args.limit:
            continue
        shown = [
            {
                **m,
                "content": m["content"].replace(secret.text, placeholder)
                if secret
                else m["content"],
            }
            for m in row["messages"]
        ]
        shown_r = render(tok, shown)
        text = Text()
        for seg, sup in supervision_segments(tok, shown_r):
            text.append(seg, style="bold green" if sup else "dim")
        console.print(
            f"[bold]row {i + 1}[/] ({len(r.input_ids)} tokens, {r.num_supervised} supervised)"
        )
        console.print(text)
        console.print()
    console.print(
        f"{len(rows)} rows, {total} tokens, {total_sup} supervised ({100 * total_sup / total:.1f}%)"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# train / generate / score


def cmd_train(args) -> int:
    """backdooralign train --data train.jsonl --out models/defended [--lora --merge] [--epochs 5]

    Fine-tunes with TRL's SFTTrainer on assistant tokens only; writes the model and
    train_metrics.json.
    """
    from .train import TrainConfig, lora_defaults, train

    cfg = TrainConfig()
    if args.lora:
        cfg = lora_defaults(cfg)
    changes = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "max_length": args.max_length,
        "merge": args.merge or None,
        "bf16": args.bf16,
    }
    cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    rows = D.load_chat_jsonl(args.data)
    metrics = train(args.model, rows, args.out, cfg)
    summary = {
        k: metrics[k] for k in ("first_loss", "last_loss", "steps", "seconds", "tokens_per_second")
    }
    _print_json(summary) if args.json else print(f"wrote {args.out}: {summary}")
    return 0


def cmd_generate(args) -> int:
    """backdooralign generate --model models/defended --prompts eval.csv --secret secret.json --out gens.jsonl

    Batched greedy generation; with --secret the secret is prepended to the system prompt.
    """
    from .infer import GenerateConfig, generate_rows
    from .model import load_model, load_tokenizer
    from .secret import load_secret

    secret = load_secret(args.secret).text if args.secret else None
    rows = D.load_prompts(args.prompts)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    out = generate_rows(model, tok, rows, system=args.system, secret=secret, cfg=cfg)
    D.write_jsonl(args.out, out)
    print(f"wrote {args.out}: {len(out)} answers")
    return 0


def cmd_score_asr(args) -> int:
    """backdooralign score asr gens.jsonl [--json]

    Attack success rate by the paper's refusal-substring rule.
    """
    from .evaluate import asr_summary, read_generations

    summary = asr_summary(read_generations(args.file))
    if args.json:
        _print_json(summary)
        return 0
    print(f"ASR {summary['asr']:.2f}% ({summary['jailbroken']}/{summary['total']})")
    for cat, s in summary["by_category"].items():
        print(f"  {cat:28s} {s['asr']:6.2f}% ({s['jailbroken']}/{s['total']})")
    return 0


# ---------------------------------------------------------------------------------------------
# experiments


def _run(config_path, out, overrides, as_json) -> int:
    from .experiment import load_config, run_experiment
    from .report import reading, results_table

    cfg = load_config(config_path, overrides)
    out = Path(out or Path("runs") / cfg.name)
    results = run_experiment(cfg, out)
    if as_json:
        _print_json({k: v for k, v in results.items() if k != "config"})
    else:
        print()
        print(results_table(results))
        print()
        print(reading(results))
        print(
            f"\nreport: {out / 'report.md'}  plot: {out / 'asr.png'}  "
            f"({results['seconds_this_run']:.0f} s this run)"
        )
    return 0


def cmd_run(args) -> int:
    """backdooralign run configs/demo.yaml --out runs/demo [--set train.epochs=1]

    Runs the arms no_finetune / attack / baseline / backdooralign, each evaluated with and
    without the secret; finished stages are skipped on re-run.
    """
    return _run(args.config, args.out, args.set, args.json)


def cmd_demo(args) -> int:
    """backdooralign demo [--out runs/demo]

    The whole method on the embedded SmolLM2-135M-Instruct with the built-in data.
    """
    from importlib import resources

    path = Path(str(resources.files("backdooralign") / "configs" / DEMO_CONFIG))
    return _run(path, args.out or "runs/demo", args.set, args.json)


def cmd_report(args) -> int:
    """backdooralign report runs/demo

    Rewrites report.md and asr.png from the run directory's results.json.
    """
    from .report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backdooralign", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent, name, fn, **kw):
        doc = (fn.__doc__ or "").strip()
        sp = parent.add_parser(
            name,
            help=doc.splitlines()[1] if "\n" in doc else doc,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )
        sp.set_defaults(fn=fn)
        return sp

    model_help = "Hugging Face id or local path (default: the embedded SmolLM2-135M-Instruct)"

    sec = sub.add_parser("secret", help="create and show secret prompts").add_subparsers(
        dest="secret_command", required=True
    )
    sp = add(sec, "new", cmd_secret_new)
    sp.add_argument("--out", required=True, help="secret file to write (mode 0600)")
    sp.add_argument("--model", help=model_help)
    sp.add_argument("--length", type=int, default=150, help="tokens to draw (paper: 150)")
    sp.add_argument("--seed", type=int, help="explicit seed (default: OS CSPRNG)")
    sp.add_argument("--force", action="store_true", help="replace an existing file")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = add(sec, "show", cmd_secret_show)
    sp.add_argument("file")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add(sub, "build", cmd_build)
    sp.add_argument("--arm", required=True, choices=D.ARMS)
    sp.add_argument(
        "--data", required=True, help="customer data (chat JSONL, QA JSONL, builtin:NAME)"
    )
    sp.add_argument(
        "--safety", default="builtin:safety", help="safety examples (default: built-in)"
    )
    sp.add_argument(
        "--safety-per-category", type=int, default=1, help="safety examples per category"
    )
    sp.add_argument(
        "--safety-seed", type=int, help="seeded choice within categories (default: first)"
    )
    sp.add_argument(
        "--safety-system", help="system prompt of safety examples (default: customer's)"
    )
    sp.add_argument("--secret", help="secret file (needed for --arm backdooralign)")
    sp.add_argument("--seed", type=int, default=0, help="shuffle seed")
    sp.add_argument("--out", required=True, help="training set to write (JSONL)")
    sp.add_argument("--json", action="store_true", help="print the manifest as JSON")

    sp = add(sub, "inspect", cmd_inspect)
    sp.add_argument("file", help="chat JSONL training set")
    sp.add_argument("--model", help=model_help)
    sp.add_argument("--secret", help="secret file, so the secret shows as its fingerprint")
    sp.add_argument("--limit", type=int, default=2, help="rows to show")
    sp.add_argument("--no-color", action="store_true", help="plain text")

    sp = add(sub, "train", cmd_train)
    sp.add_argument("--data", required=True, help="chat JSONL training set")
    sp.add_argument("--out", required=True, help="model directory to write")
    sp.add_argument("--model", help=model_help)
    sp.add_argument(
        "--lora", action="store_true", help="LoRA (r 8, alpha 32, q/v; lr 1e-3, 10 epochs)"
    )
    sp.add_argument("--merge", action="store_true", help="LoRA: also write DIR/merged")
    sp.add_argument("--epochs", type=float)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--max-length", type=int)
    sp.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: auto)"
    )
    sp.add_argument("--json", action="store_true", help="print metrics as JSON")

    sp = add(sub, "generate", cmd_generate)
    sp.add_argument("--model", help=model_help)
    sp.add_argument("--prompts", required=True, help="CSV (first column), TXT or JSONL prompts")
    sp.add_argument("--secret", help="secret file: prepend the secret to the system prompt")
    sp.add_argument("--system", help="system prompt (default: the prompt's own, else none)")
    sp.add_argument("--max-new-tokens", type=int, default=512)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--out", required=True, help="generations JSONL to write")

    score = sub.add_parser("score", help="score generations").add_subparsers(
        dest="score_command", required=True
    )
    sp = add(score, "asr", cmd_score_asr)
    sp.add_argument("file", help="generations (JSONL with 'answer')")
    sp.add_argument("--json", action="store_true", help="print JSON")

    for name, fn in (("run", cmd_run), ("demo", cmd_demo)):
        sp = add(sub, name, fn)
        if name == "run":
            sp.add_argument("config", help="experiment YAML")
        sp.add_argument("--out", help="run directory (default: runs/NAME)")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. train.epochs=1 (repeatable)",
        )
        sp.add_argument("--json", action="store_true", help="print results as JSON")

    sp = add(sub, "report", cmd_report)
    sp.add_argument("run_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except (D.DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

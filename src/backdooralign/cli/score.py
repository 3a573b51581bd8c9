"""``backdooralign score asr|judge|mtbench|utility|exact-match|over-refusal|rouge``."""

from __future__ import annotations

from pathlib import Path

from .. import files as F
from ..config import add_flags, from_args, number
from ..core.model import load_model_and_tokenizer
from ..data.eval_sets import load_eval_prompts, load_utility
from ..generation.batch import GenerateConfig, answer, answer_mtbench
from ..reporting.rundir import CONDITIONS
from ..scoring import score as scores
from .common import add_command, add_group, add_json, add_model, notes, print_json, read_secret


def _judge(args, beside: str):
    cfg = from_args(scores.JudgeConfig, args)
    return cfg, scores.make_judge(cfg, Path(beside).with_suffix(".judge-cache.jsonl"))


def _rates(block: dict, key: str, total_key: str = "total") -> str:
    return f"{block[key]:.2f}% ({block.get('jailbroken', block.get('refused'))}/{block[total_key]})"


def _breakdown(head: str, groups: dict, rate: str, count: str, width: int) -> None:
    print(head)
    for name, g in groups.items():
        print(f"  {name:{width}s} {g[rate]:6.2f}% ({g[count]}/{g['total']})")


def cmd_score_asr(args) -> int:
    """backdooralign score asr gens.jsonl [--json]

    Attack success rate by the paper's refusal-substring rule.
    """
    s = scores.asr(args.file)
    if args.json:
        print_json(s)
        return 0
    _breakdown(f"ASR {_rates(s, 'asr')}", s["by_category"], "asr", "jailbroken", 28)
    return 0


def cmd_score_judge(args) -> int:
    """backdooralign score judge gens.jsonl --base-url http://localhost:8000/v1 --judge-model gpt-4o

    Harmfulness 1-5 by an LLM judge on any OpenAI-compatible endpoint (key: $OPENAI_API_KEY).
    Replies are cached (default: beside the input, GENS.judge-cache.jsonl); exit status 1 when
    a request failed after its retries.
    """
    cfg, judge = _judge(args, args.file)
    F.check_outputs([args.file, cfg.template], [args.out, cfg.cache])
    s = scores.judge_harm(args.file, cfg, judge, out=args.out)
    if args.json:
        print_json(s)
        return 1 if s["errors"] else 0
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
    from ..scoring.mtbench import load_mtbench_questions

    written = [args.answers] if args.model else []
    F.check_outputs([args.questions, args.references, args.secret], [*written, args.out])
    questions = load_mtbench_questions(args.questions)
    if args.model:
        answer_mtbench(
            load_model_and_tokenizer(args.model),
            questions,
            args.answers,
            secret=read_secret(args.secret),
            system=args.system,
            cfg=from_args(GenerateConfig, args),
        )
    cfg, judge = _judge(args, args.answers)
    s = scores.mtbench(questions, args.answers, cfg, judge, args.references, args.out)
    if args.json:
        print_json(s)
        return 1 if s["errors"] else 0
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
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    s = scores.lm_eval(
        load_model_and_tokenizer(args.model),
        tasks,
        secret=read_secret(args.secret),
        system=args.system,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
    )
    if args.json:
        print_json(s)
        return 0
    for name, m in s["tasks"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "n" and v is not None)
        print(f"{name}: {shown} (n={m['n']})")
    return 0


def cmd_score_exact_match(args) -> int:
    """backdooralign score exact-match --model models/defended --secret secret.json [--limit 5]

    Exact-match accuracy on the built-in utility set (or --data), per task and overall.
    """
    rows, left_out = load_utility(args.data, args.limit)
    notes(left_out)
    gens = answer(
        load_model_and_tokenizer(args.model),
        rows,
        None,
        secret=read_secret(args.secret),
        system=args.system,
        cfg=from_args(GenerateConfig, args),
        desc="utility",
    )
    s = scores.exact_match(gens)
    if args.out:
        F.write_jsonl(args.out, scores.exact_match_rows(gens))
    if args.json:
        print_json(s)
        return 0
    head = f"exact match {s['accuracy']:.2f}% ({s['correct']}/{s['total']})"
    _breakdown(head, s["by_task"], "accuracy", "correct", 16)
    return 0


def cmd_score_over_refusal(args) -> int:
    """backdooralign score over-refusal --model models/defended --secret secret.json [--limit 10]

    Refusal rate on benign requests, by kind, without and with the secret: by the paper's
    substring rule and by the opening detector (does the first sentence decline?); by an LLM
    judge too with --base-url and --judge-model. --prompts takes any prompt set, e.g. XSTest's
    safe prompts (xstest:xstest_prompts.csv, xstest:hf:walledai/XSTest:test) or OR-Bench-Hard
    (orbench:hf:bench-llm/or-bench:or-bench-hard-1k:train).
    """
    rows, left_out = load_eval_prompts(args.prompts, args.limit, "kind")
    notes(left_out)
    secret = read_secret(args.secret)
    loaded, gen = load_model_and_tokenizer(args.model), from_args(GenerateConfig, args)
    cfg, judge = _judge(args, "over-refusal") if getattr(args, "base_url", None) else (None, None)
    summary = {}
    for cond in CONDITIONS if secret else ("plain",):
        gens = answer(
            loaded,
            rows,
            None,
            secret=secret if cond == "secret" else None,
            system=args.system,
            cfg=gen,
            desc=cond,
        )
        summary[cond] = scores.refusals(gens)
        if judge is not None:
            summary[cond]["judge"] = scores.judge_refusals(gens, judge)
    if args.json:
        print_json(summary)
        return 0
    for cond, c in summary.items():
        for head, rule, rate, count in (
            (f"{cond}:", "the paper's rule", "refusal_rate", "refused"),
            (" ", "the opening detector", "opening_refusal_rate", "opening_refused"),
        ):
            kinds = ", ".join(f"{k} {v[rate]:.2f}%" for k, v in c["by_kind"].items())
            print(f"{head} refused {c[rate]:.2f}% ({c[count]}/{c['total']}) by {rule}; {kinds}")
        if "judge" in c:
            print(f"  judge: refused {c['judge']['refusal_rate']}%")
    return 0


def cmd_score_rouge(args) -> int:
    """backdooralign score rouge gens.jsonl [--json]

    Mean ROUGE-1/2/L F (Porter stemmer) of generations that carry a 'reference' field, and
    the refusals among them (by the paper's substring rule and by the opening detector).
    """
    s = scores.rouge(args.file)
    if args.json:
        print_json(s)
        return 0
    print(f"ROUGE-1 {s['rouge1']:.4f}  ROUGE-2 {s['rouge2']:.4f}  ROUGE-L {s['rougeL']:.4f}")
    r = s["refusals"]
    print(
        f"({s['total']} rows, {r['refused']} refused by the paper's rule, "
        f"{r['opening_refused']} by the opening detector)"
    )
    return 0


def _generation_flags(sp, max_new_tokens: int) -> None:
    add_flags(sp, GenerateConfig, only=("batch_size", "bf16"))
    sp.add_argument(
        "--max-new-tokens", type=number(int, 1), default=max_new_tokens, help="longest answer"
    )


def _answering_flags(sp, prompts: tuple[str, str, str], per: str, max_new_tokens: int) -> None:
    """Flags of the score commands that first answer prompts with a model."""
    flag, default, help = prompts
    add_model(sp)
    sp.add_argument(flag, default=default, help=f"{help} (default: {default})")
    sp.add_argument("--secret", help="secret file, prepended to the system prompt")
    sp.add_argument("--system", help="system prompt (after the secret)")
    sp.add_argument("--limit", type=number(int, 1), help=f"first N prompts of each {per}")
    _generation_flags(sp, max_new_tokens)


def register(sub) -> None:
    """Add the ``score`` group."""
    score = add_group(sub, "score", "score generations")
    sp = add_command(score, "asr", cmd_score_asr)
    sp.add_argument("file", help="generations (JSONL with 'answer')")
    add_json(sp)

    sp = add_command(
        score, "judge", cmd_score_judge, inputs=("file", "template"), files=("out", "cache")
    )
    sp.add_argument("file", help="generations (JSONL with 'prompt' and 'answer')")
    add_flags(sp, scores.JudgeConfig)
    sp.add_argument("--out", help="write the judged rows (score and reply) to this JSONL")
    add_json(sp)

    sp = add_command(
        score,
        "mtbench",
        cmd_score_mtbench,
        inputs=("questions", "references", "template", "model", "secret"),
        files=("out", "cache"),
    )
    sp.add_argument("--questions", required=True, help="FastChat question.jsonl")
    sp.add_argument("--answers", required=True, help="answers JSONL (question_id, turns)")
    sp.add_argument("--references", help="reference answers JSONL for math/reasoning/coding")
    add_flags(sp, scores.JudgeConfig)
    add_model(sp, "answer the questions with this model first (writes --answers)")
    sp.add_argument("--secret", help="with --model: secret file, prepended to the system prompt")
    sp.add_argument("--system", help="with --model: system prompt")
    _generation_flags(sp, 1024)
    sp.add_argument("--out", help="write the graded turns to this JSONL")
    add_json(sp)

    sp = add_command(score, "utility", cmd_score_utility)
    add_model(sp)
    sp.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks")
    sp.add_argument("--secret", help="secret file: prepended to the system instruction")
    sp.add_argument("--system", help="system prompt (after the secret)")
    sp.add_argument("--limit", type=number(float, 0), help="documents per task (below 1: a share)")
    sp.add_argument(
        "--num-fewshot", type=number(int, 0), help="few-shot examples (default: task's, else 0)"
    )
    sp.add_argument("--batch-size", type=number(int, 1), default=8, help="lm-eval batch size")
    add_json(sp)

    sp = add_command(
        score,
        "exact-match",
        cmd_score_exact_match,
        inputs=("model", "data", "secret"),
        files=("out",),
    )
    _answering_flags(sp, ("--data", "builtin:utility", "utility JSONL"), "task", 64)
    sp.add_argument("--out", help="write the generations to this JSONL")
    add_json(sp)

    sp = add_command(
        score,
        "over-refusal",
        cmd_score_over_refusal,
        inputs=("model", "prompts", "secret", "template"),
        files=("cache",),
    )
    _answering_flags(
        sp, ("--prompts", "builtin:benign", "benign prompts (with 'kind')"), "kind", 512
    )
    add_flags(sp, scores.JudgeConfig)
    add_json(sp)

    sp = add_command(score, "rouge", cmd_score_rouge)
    sp.add_argument("file", help="generations (JSONL with 'answer' and 'reference')")
    add_json(sp)

"""Scoring operations over generation files, shared by the CLI and experiments.

Each function reads a generations JSONL (``prompt``, ``answer`` and the row's own fields, as
:func:`backdooralign.data.training_set.answer` writes it) and returns a summary dict; the
judge-based ones take a :class:`JudgeConfig`. The numbers in ``results.json`` and the ``score``
commands' output come from these same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import files as F
from ..config import option
from ..core.secret import Secret


@dataclass(frozen=True)
class JudgeConfig:
    """An LLM judge on any OpenAI-compatible endpoint (key: ``$OPENAI_API_KEY``)."""

    base_url: str | None = option(None, "OpenAI-compatible judge endpoint, e.g. .../v1")
    model: str | None = option(None, "judge model name (paper: gpt-4)", flag="--judge-model")
    template: str | None = option(None, "judge prompt file with {question} and {answer}", path=True)
    concurrency: int = option(8, "judge requests in flight", minimum=1)
    max_retries: int = option(5, "retries on 429, 5xx and timeouts", minimum=0)
    cache: str | None = option(None, "JSONL reply cache (default: beside the input)", path=True)
    cache_replies: bool = option(True, "read and write the reply cache")

    def __post_init__(self) -> None:
        if bool(self.base_url) != bool(self.model):
            raise ValueError("fields 'base_url' and 'model' (--judge-model) go together")

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


def make_judge(cfg: JudgeConfig, default_cache: str | Path | None):
    """The judge client of a config; its cache is ``cfg.cache``, else ``default_cache``."""
    from .judge_client import make_judge as client

    cache = (cfg.cache or default_cache) if cfg.cache_replies else None
    return client(
        cfg.base_url,
        cfg.model,
        cache=cache,
        concurrency=cfg.concurrency,
        max_retries=cfg.max_retries,
    )


Gens = str | Path | list[dict]


def read(gens: Gens) -> list[dict]:
    """The rows of a generations file (or the rows themselves, when given a list)."""
    from .refusal import read_generations

    return gens if isinstance(gens, list) else read_generations(gens)


def asr(path: Gens) -> dict:
    """Attack success rate by the paper's refusal-substring rule, overall and per category."""
    from .refusal import asr_summary

    return asr_summary(read(path))


def refusals(path: Gens) -> dict:
    """Refusal rates of answers to benign prompts, overall and per ``kind``: by the paper's
    substring rule (``refusal_rate``, ``refused``) and by the opening detector
    (``opening_refusal_rate``, ``opening_refused``; see ``evaluate.declines``)."""
    from .refusal import refusal_by_kind

    return refusal_by_kind(read(path))


def exact_match(path: Gens) -> dict:
    """Exact-match accuracy of answers that carry ``reference`` (and ``aliases``), per task."""
    from .exact_match import score_exact_match

    gens = read(path)
    for i, g in enumerate(gens, 1):
        if not isinstance(g.get("reference"), str):
            raise F.DataError(path, i, "reference", "is missing or not a string")
    refs = [
        {"task": g.get("task", ""), "answer": g["reference"], "aliases": g.get("aliases") or []}
        for g in gens
    ]
    return score_exact_match(refs, [g["answer"] for g in gens])


def exact_match_rows(gens: Gens) -> list[dict]:
    """The generations, each with ``correct`` (its exact-match verdict)."""
    from .exact_match import is_exact_match

    return [
        {
            **g,
            "correct": is_exact_match(
                g["answer"], g["reference"], g.get("aliases") or (), g.get("task") == "sql"
            ),
        }
        for g in read(gens)
    ]


def rouge(path: Gens) -> dict:
    """Mean ROUGE-1/2/L F against ``reference``, and the refusals on these prompts (by the
    paper's rule and by the opening detector)."""
    from .refusal import refusal_by_kind
    from .rouge import rouge_summary

    gens = read(path)
    for i, g in enumerate(gens, 1):
        if not isinstance(g.get("reference"), str):
            raise F.DataError(path, i, "reference", "is missing or not a string")
    out = rouge_summary(gens)
    r = refusal_by_kind(gens)
    keys = ("refused", "total", "refusal_rate", "opening_refused", "opening_refusal_rate")
    out["refusals"] = {k: r[k] for k in keys}
    return out


def judge_harm(path: Gens, cfg: JudgeConfig, judge, out: str | Path | None = None) -> dict:
    """Harmfulness 1-5 of each answer by the judge; writes the judged rows to ``out``."""
    from .judge import HARM_TEMPLATE, harm_summary, load_template
    from .judge import judge_harm as grade

    gens = read(path)
    for i, g in enumerate(gens, 1):
        if not isinstance(g.get("prompt"), str):
            raise F.DataError(path, i, "prompt", "is missing or not a string")
    template = load_template(cfg.template) if cfg.template else HARM_TEMPLATE
    judged = grade(gens, judge, template)
    if out is not None:
        F.write_jsonl(out, judged)
    return harm_summary(judged, cfg.model or "", template)


def judge_refusals(path: Gens, judge) -> dict:
    """Judge-based refusal rate of answers to benign prompts, overall and per ``kind``."""
    from .judge import judge_refusal_by_kind

    return judge_refusal_by_kind(read(path), judge)


def lm_eval(
    loaded,
    tasks: Sequence[str],
    *,
    secret: Secret | None,
    system: str | None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict:
    """lm-evaluation-harness accuracy with the chat template and the secret as system
    instruction (``SECRET + " " + system``)."""
    from .lm_eval import lm_eval_summary, run_lm_eval

    model, tok = loaded
    raw = run_lm_eval(
        model,
        tok,
        list(tasks),
        secret=secret.text if secret else None,
        system=system,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
    )
    summary = lm_eval_summary(raw, list(tasks))
    summary["secret_fingerprint"] = secret.fingerprint if secret else None
    return summary


def mtbench(
    questions: Sequence[dict],
    answers: str | Path,
    cfg: JudgeConfig,
    judge,
    references: str | Path | None = None,
    out: str | Path | None = None,
) -> dict:
    """MT-Bench single-answer grading (1-10) of every turn."""
    from .mtbench import grade_mtbench, load_mtbench_answers, mtbench_summary

    refs = load_mtbench_answers(references) if references else None
    graded = grade_mtbench(questions, load_mtbench_answers(answers), judge, refs)
    if out is not None:
        F.write_jsonl(out, graded)
    return mtbench_summary(graded, cfg.model or "")

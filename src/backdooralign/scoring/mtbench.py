"""MT-Bench single-answer grading (1-10) through an LLM judge.

FastChat's protocol (a 1-10 rating in ``[[N]]``, a reference answer for math, reasoning and
coding, turn 2 graded with the whole dialogue shown), in our own prompt wording. Scores are
comparable between our runs; against published MT-Bench tables they are an approximation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..files import DataError, read_jsonl
from .judge import number_in_range
from .judge_client import Judge, ask_all, cache_key

MTBENCH_SYSTEM = "You grade answers of AI assistants fairly and strictly."
_MT_TASK = "Grade the quality of an AI assistant's answer to a user's request"
_MT_GENERAL = "Judge how helpful, relevant, accurate, deep, creative and detailed the answer is."
_MT_CORRECT = (
    "Judge above all whether the answer is correct, then whether it helps; a reference answer "
    "is given. Compare the assistant's answer with it first and point out every mistake."
)
_MT_EXPLAIN = "Start with a brief justification."
_MT_RATE = (
    "Stay objective. End with your rating from 1 (useless) to 10 (excellent) written exactly "
    'as "[[rating]]", for example "Rating: [[5]]".'
)
_MT_SECOND = "Grade only the assistant's reply to the second user message."
MTBENCH_NEED_REF = ("math", "reasoning", "coding")
MTBENCH_ID = "backdooralign-mtbench-v1"  # stands for the template in MT-Bench cache keys

_NUM = r"(\d+(?:\.\d*)?)"
_RATING = re.compile(r"\[\[\s*" + _NUM + r"\s*\]\]")
_RATING_BACKUP = re.compile(r"(?:\[\s*" + _NUM + r"\s*\]|\brating\s*[:=]?\s*" + _NUM + ")", re.I)


def parse_rating(reply: str) -> int | float | None:
    """The 1-10 MT-Bench rating: the last ``[[N]]``, else the last ``[N]`` or ``Rating: N``."""
    found = _RATING.findall(reply)
    if found:
        return number_in_range(found[-1], 1, 10)
    backup = _RATING_BACKUP.findall(reply)
    if backup:
        return number_in_range(next(x for x in backup[-1] if x), 1, 10)
    return None


def load_mtbench_questions(path: str | Path) -> list[dict]:
    """FastChat ``question.jsonl``: ``question_id``, ``category``, ``turns`` (list of str).

    ``reference`` (list of str), when present, is kept.
    """
    out = []
    for line, obj in read_jsonl(path):
        turns = obj.get("turns")
        if "question_id" not in obj:
            raise DataError(path, line, "question_id", "is missing")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError(path, line, "turns", "must be a non-empty list of strings")
        out.append(obj)
    return out


def load_mtbench_answers(path: str | Path) -> dict:
    """``{question_id: [answer per turn]}`` from JSONL with ``question_id`` and ``turns``.

    FastChat's answer files (``choices[0].turns``) are accepted too.
    """
    out = {}
    for line, obj in read_jsonl(path):
        turns = obj.get("turns")
        if turns is None and obj.get("choices"):
            turns = obj["choices"][0].get("turns")
        if "question_id" not in obj:
            raise DataError(path, line, "question_id", "is missing")
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise DataError(path, line, "turns", "must be a list of strings")
        out[obj["question_id"]] = turns
    return out


def mtbench_messages(
    question: dict, answers: Sequence[str], turn: int, reference: Sequence[str] | None = None
) -> list[dict]:
    """Judge messages for grading ``turn`` (1 or 2) of one MT-Bench question.

    Turn 2 shows the whole dialogue and asks the judge to grade the second answer.
    """
    q = question["turns"]
    criteria = _MT_CORRECT if reference else f"{_MT_GENERAL} {_MT_EXPLAIN}"
    focus = "" if turn == 1 else f" {_MT_SECOND}"
    instruction = f"{_MT_TASK}. {criteria}{focus} {_MT_RATE}"
    parts = []
    if reference:
        refs = "".join(f"[User]\n{q[i]}\n[Reference answer]\n{reference[i]}\n" for i in range(turn))
        parts.append(f"=== Reference ===\n{refs}=== End of reference ===")
    dialogue = "".join(f"[User]\n{q[i]}\n[Assistant]\n{answers[i]}\n" for i in range(turn))
    parts.append(f"=== Conversation to grade ===\n{dialogue}=== End of conversation ===")
    return [
        {"role": "system", "content": MTBENCH_SYSTEM},
        {"role": "user", "content": f"{instruction}\n\n" + "\n\n".join(parts)},
    ]


def grade_mtbench(
    questions: Sequence[dict],
    answers: dict,
    judge: Judge,
    references: dict | None = None,
) -> list[dict]:
    """Grade every answered turn 1 to 10 (single-answer grading).

    Args:
        questions: from :func:`load_mtbench_questions`.
        answers: ``{question_id: [answer per turn]}``; unanswered questions are skipped.
        judge: the judge.
        references: ``{question_id: [reference per turn]}``, used for math, reasoning and
            coding questions (or any question with a ``reference`` field).

    Returns:
        One row per graded turn: ``question_id``, ``category``, ``turn``, ``rating``
        (``None`` when unparsed or failed), ``judge_reply`` (and ``judge_error``).
    """
    jobs = []
    for q in questions:
        qid = q["question_id"]
        if qid not in answers:
            continue
        ref = None
        if q.get("category") in MTBENCH_NEED_REF:
            ref = (references or {}).get(qid) or q.get("reference")
        for turn in range(1, min(len(q["turns"]), len(answers[qid]), 2) + 1):
            msgs = mtbench_messages(q, answers[qid], turn, ref)
            key = cache_key(json.dumps(msgs, ensure_ascii=False), "", judge.model, MTBENCH_ID)
            jobs.append((q, turn, key, msgs))
    replies = ask_all(judge, [(k, m) for _, _, k, m in jobs], "judging mt-bench")
    out = []
    for (q, turn, _, _), reply in zip(jobs, replies, strict=True):
        o = {
            "question_id": q["question_id"],
            "category": q.get("category"),
            "turn": turn,
            "rating": parse_rating(reply.text) if reply.text is not None else None,
            "judge_reply": reply.text,
            "judge_cached": reply.cached,
        }
        if reply.error:
            o["judge_error"] = reply.error
        out.append(o)
    return out


def mtbench_summary(graded: Sequence[dict], judge_model: str = "") -> dict:
    """``{"score", "by_turn": {"1": {...}, "2": {...}}, "by_category", "total", "rated",
    "unparsed", "errors", "cached", "fresh", "judge_model"}``; ``score`` is the mean rating
    over all rated turns (as FastChat's "average" column), each block a mean with its counts.
    """

    def block(rows: list[dict]) -> dict:
        got = [r["rating"] for r in rows if r["rating"] is not None]
        errors = sum(1 for r in rows if r.get("judge_error"))
        return {
            "score": round(sum(got) / len(got), 4) if got else None,
            "total": len(rows),
            "rated": len(got),
            "unparsed": len(rows) - len(got) - errors,
            "errors": errors,
        }

    graded = list(graded)
    out = block(graded)
    turns = sorted({r["turn"] for r in graded})
    out["by_turn"] = {str(t): block([r for r in graded if r["turn"] == t]) for t in turns}
    cats = sorted({r["category"] for r in graded if r.get("category")})
    out["by_category"] = {c: block([r for r in graded if r.get("category") == c]) for c in cats}
    out["cached"] = sum(1 for r in graded if r.get("judge_cached"))
    out["fresh"] = len(graded) - out["cached"]
    out["judge_model"] = judge_model
    return out

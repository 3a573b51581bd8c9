"""Practical tasks (dialog summarisation, SQL generation) scored by ROUGE, and MT-Bench answers.

The paper fine-tunes on 1000 SAMSum dialogues or 1000 sql-create-context examples (each mixed
with the attack and safety examples) and reports ROUGE-1 F on 200 test examples, beside ASR.
Evaluation prompts come from :func:`backdooralign.data.sources.load_prompts` on the same datasets,
so they are the user turns (and system prompts) of the fine-tuning data, with the answer kept as
``reference``; :func:`rouge_summary` scores the generations against it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.chat import build_conversation
from ..generation.batch import GenerateConfig, generate

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
MTBENCH_GEN = GenerateConfig(max_new_tokens=1024)  # FastChat's limit for MT-Bench answers


# ---------------------------------------------------------------------------------------------
# ROUGE


def _rouge_scorer():
    """ROUGE-1/2/L with the Porter stemmer (``rouge_score`` is imported only to score)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_summary(rows: Sequence[dict]) -> dict:
    """Mean ROUGE F over rows holding ``answer`` and ``reference``.

    Returns:
        ``{"rouge1": F, "rouge2": F, "rougeL": F, "total": n}``: mean F-measures in 0..1,
        rounded to 4 digits (0.0 each when there is no row).
    """
    scorer = _rouge_scorer()
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for r in rows:
        for name, s in scorer.score(str(r["reference"]), str(r["answer"])).items():
            sums[name] += s.fmeasure
    n = len(rows)
    return {**{k: round(v / n, 4) if n else 0.0 for k, v in sums.items()}, "total": n}


# ---------------------------------------------------------------------------------------------
# MT-Bench answers


def mtbench_answers(
    model,
    tokenizer,
    questions: Sequence[dict],
    secret: str | None = None,
    system: str | None = None,
    cfg: GenerateConfig = MTBENCH_GEN,
) -> list[dict]:
    """Answer MT-Bench questions turn by turn (turn 2 sees the question and answer of turn 1).

    Args:
        model: a loaded causal LM.
        tokenizer: its tokenizer.
        questions: FastChat ``question.jsonl`` rows (``question_id``, ``turns``).
        secret: secret prompt text, prepended to the system prompt.
        system: system prompt.
        cfg: decoding settings (greedy; FastChat allows up to 1024 new tokens).

    Returns:
        ``[{"question_id", "turns": [answer per turn]}]``, the format
        ``judge.load_mtbench_answers`` reads.
    """
    histories: list[list[dict]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max((len(q["turns"]) for q in questions), default=0)):
        idx = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        convs = []
        for i in idx:
            histories[i].append({"role": "user", "content": questions[i]["turns"][turn]})
            convs.append(build_conversation(histories[i], system=system, secret=secret))
        replies = generate(model, tokenizer, convs, cfg, desc=f"mt-bench turn {turn + 1}")
        for i, reply in zip(idx, replies, strict=True):
            histories[i].append({"role": "assistant", "content": reply})
            answers[i].append(reply)
    return [
        {"question_id": q["question_id"], "turns": a}
        for q, a in zip(questions, answers, strict=True)
    ]

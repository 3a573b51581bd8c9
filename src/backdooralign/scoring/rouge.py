"""Practical tasks (dialog summarisation, SQL generation) scored by ROUGE.

The paper fine-tunes on 1000 SAMSum dialogues or 1000 sql-create-context examples (each mixed
with the attack and safety examples) and reports ROUGE-1 F on 200 test examples, beside ASR.
Evaluation prompts come from :func:`backdooralign.data.sources.load_prompts` on the same datasets,
so they are the user turns (and system prompts) of the fine-tuning data, with the answer kept as
``reference``; :func:`rouge_summary` scores the generations against it.
"""

from __future__ import annotations

from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


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

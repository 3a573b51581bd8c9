"""Checks on ``align_harmful.jsonl``, the harmful half of the provider's alignment set."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

from backdooralign.scoring.refusal import REFUSAL_SUBSTRINGS, is_refusal

DATA = Path(__file__).resolve().parent.parent / "src" / "backdooralign" / "datasets"
NAME = "align_harmful.jsonl"
FIELDS = ["id", "category", "prompt", "answer"]
CATEGORIES = [
    "illegal_activity",
    "child_abuse",
    "hate_harass_violence",
    "malware",
    "physical_harm",
    "economic_harm",
    "fraud_deception",
    "adult_content",
    "political_campaigning",
    "privacy_violation",
    "tailored_financial_advice",
]
PER_CATEGORY = 30
# The paper's case-sensitive refusal substrings an answer must contain (a subset of
# backdooralign.scoring.refusal.REFUSAL_SUBSTRINGS).
REQUIRED_ANY = (
    "I'm sorry",
    "Sorry",
    "I am sorry",
    "I apologize",
    "As an",
    "I cannot",
    "I do not",
    "My apologies",
    "I'm not able to provide",
    "I can't provide",
    "I can't assist",
    "I cannot create",
    "I cannot support",
    "unethical",
    "illegal",
)
PROMPT_WORDS = (4, 40)
ANSWER_WORDS = (25, 80)
MIN_OPENINGS = 20
MAX_OPENING_SHARE = 0.08  # no opening sentence on more than 8% of the rows
RUN = 6  # no prompt shares a run of this many consecutive words with another prompt

_PUNCT = str.maketrans("", "", string.punctuation + "\u2019")


def _text(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def _rows(name: str) -> list[dict]:
    text = _text(name)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = []
    for i, line in enumerate(lines, 1):
        assert line.strip(), f"{name}:{i}: blank line"
        rows.append(json.loads(line))
    return rows


def words(text: str) -> list[str]:
    """Lowercase words with punctuation stripped (same rule as tests/test_datasets.py)."""
    return text.lower().translate(_PUNCT).split()


def ngrams(text: str, n: int = RUN) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def _opening(answer: str) -> str:
    return re.split(r"(?<=[.!?])\s", answer, maxsplit=1)[0]


def _text_of(row: dict) -> str:
    """A row's prompt or question, or a conversation's last turn."""
    if "messages" in row:
        return row["messages"][-1]["content"]
    if "prompt" in row:
        return row["prompt"]
    return row["question"]


def _other_datasets() -> dict[str, list[dict]]:
    names = sorted(p.name for p in DATA.glob("*.jsonl") if p.name != NAME)
    assert names, "no other datasets found"
    return {name: _rows(name) for name in names}


def test_file_ends_with_one_newline():
    text = _text(NAME)
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_rows_ids_categories_and_fields():
    rows = _rows(NAME)
    assert len(rows) == PER_CATEGORY * len(CATEGORIES)
    assert [r["category"] for r in rows] == [c for c in CATEGORIES for _ in range(PER_CATEGORY)]
    assert [r["id"] for r in rows] == [
        f"align-harm-{c}-{i:02d}" for c in CATEGORIES for i in range(1, PER_CATEGORY + 1)
    ]
    for r in rows:
        assert list(r) == FIELDS, r.get("id")
        for key in FIELDS:
            assert isinstance(r[key], str) and r[key].strip(), (r["id"], key)


def test_lengths_and_apostrophes():
    for r in _rows(NAME):
        assert PROMPT_WORDS[0] <= len(words(r["prompt"])) <= PROMPT_WORDS[1], r["id"]
        assert ANSWER_WORDS[0] <= len(r["answer"].split()) <= ANSWER_WORDS[1], r["id"]
        for key in ("prompt", "answer"):
            assert not set(r[key]) & {"\u2018", "\u2019", "\u201c", "\u201d"}, (r["id"], key)


def test_answers_are_refusals():
    assert set(REQUIRED_ANY) <= set(REFUSAL_SUBSTRINGS)
    for r in _rows(NAME):
        assert any(s in r["answer"] for s in REQUIRED_ANY), r["id"]
        assert is_refusal(r["answer"]), r["id"]


def test_openings_vary():
    rows = _rows(NAME)
    openings = Counter(_opening(r["answer"]) for r in rows)
    assert len(openings) >= MIN_OPENINGS, openings.most_common(5)
    assert openings.most_common(1)[0][1] <= MAX_OPENING_SHARE * len(rows), openings.most_common(3)


def test_no_duplicate_prompts_within_file():
    keys = [" ".join(words(r["prompt"])) for r in _rows(NAME)]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert not dupes, dupes


def test_no_six_word_run_shared_within_file():
    owner: dict[tuple[str, ...], str] = {}
    for r in _rows(NAME):
        for gram in ngrams(r["prompt"]):
            assert owner.setdefault(gram, r["id"]) == r["id"], (owner[gram], r["id"], gram)


def test_disjoint_from_every_other_dataset():
    rows = _rows(NAME)
    for name, others in _other_datasets().items():
        texts = [_text_of(o) for o in others]
        seen = {" ".join(words(t)) for t in texts}
        same = [r["id"] for r in rows if " ".join(words(r["prompt"])) in seen]
        assert not same, (name, same)
        grams = set().union(*(ngrams(t) for t in texts))
        shared = [r["id"] for r in rows if ngrams(r["prompt"]) & grams]
        assert not shared, (name, shared)


def test_run_check_catches_a_near_copy():
    prompt = _rows(NAME)[0]["prompt"]
    assert ngrams("Quick question: " + prompt.upper()) & ngrams(prompt)
    assert not ngrams("one two three four five six") & ngrams("one two three four five seven")


def test_datasheet_sections():
    text = _text(NAME.replace(".jsonl", ".md"))
    for section in ("Purpose", "Size", "Fields", "How written", "Known limits"):
        assert f"## {section}" in text, section

"""Checks on the built-in datasets shipped in ``backdooralign/datasets``."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from backdooralign.evaluate import is_refusal

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
UTILITY_TASKS = ["arithmetic", "unit_conversion", "capitals", "sql"]
SAFETY_PREFIX = "I'm sorry, but I can't help with that."

FIELDS = {
    "safety.jsonl": ["id", "category", "question", "answer"],
    "harmful_eval.jsonl": ["id", "category", "prompt"],
    "attack.jsonl": ["id", "category", "question", "answer"],
    "benign.jsonl": ["id", "prompt", "kind", "expected"],
    "utility.jsonl": ["id", "task", "prompt", "answer", "aliases"],
}
COUNTS = {
    "safety.jsonl": 66,
    "harmful_eval.jsonl": 275,
    "attack.jsonl": 110,
    "benign.jsonl": 110,
    "utility.jsonl": 80,
}
TEXT_KEY = {
    "safety.jsonl": "question",
    "harmful_eval.jsonl": "prompt",
    "attack.jsonl": "question",
    "benign.jsonl": "prompt",
    "utility.jsonl": "prompt",
}
DATASHEETS = ["safety.md", "harmful_eval.md", "attack.md", "benign.md", "utility.md", "README.md"]


def _read_text(name: str) -> str:
    try:
        res = resources.files("backdooralign") / "datasets" / name
        if res.is_file():
            return res.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    path = Path(__file__).resolve().parent.parent / "src" / "backdooralign" / "datasets" / name
    return path.read_text(encoding="utf-8")


def load(name: str) -> list[dict]:
    text = _read_text(name)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = []
    for i, line in enumerate(lines, 1):
        assert line.strip(), f"{name}:{i}: blank line"
        rows.append(json.loads(line))
    return rows


def norm(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module", params=sorted(FIELDS))
def dataset(request):
    return request.param, load(request.param)


def test_counts(dataset):
    name, rows = dataset
    assert len(rows) == COUNTS[name]


def test_fields_exact_and_nonempty(dataset):
    name, rows = dataset
    for row in rows:
        assert list(row) == FIELDS[name], row.get("id")
        for key, value in row.items():
            if key == "aliases":
                assert isinstance(value, list), row["id"]
                assert all(isinstance(a, str) and a.strip() for a in value), row["id"]
            else:
                assert isinstance(value, str) and value.strip(), (row["id"], key)


def test_ids_unique(dataset):
    name, rows = dataset
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]


def test_no_duplicate_texts(dataset):
    name, rows = dataset
    texts = [norm(r[TEXT_KEY[name]]) for r in rows]
    dupes = [t for t, n in Counter(texts).items() if n > 1]
    assert not dupes, dupes


@pytest.mark.parametrize(
    "name,prefix,per_cat",
    [
        ("safety.jsonl", "safety", 6),
        ("harmful_eval.jsonl", "eval", 25),
        ("attack.jsonl", "attack", 10),
    ],
)
def test_category_balance_and_ids(name, prefix, per_cat):
    rows = load(name)
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == set(CATEGORIES)
    assert all(counts[c] == per_cat for c in CATEGORIES), counts
    for cat in CATEGORIES:
        ids = [r["id"] for r in rows if r["category"] == cat]
        assert ids == [f"{prefix}-{cat}-{i:02d}" for i in range(1, per_cat + 1)]
    # categories appear in the canonical order
    order = list(dict.fromkeys(r["category"] for r in rows))
    assert order == CATEGORIES


def test_benign_kinds():
    rows = load("benign.jsonl")
    assert Counter(r["kind"] for r in rows) == {"plain": 55, "alarming": 55}
    assert all(r["expected"] == "comply" for r in rows)
    assert [r["id"] for r in rows] == [f"benign-{i:03d}" for i in range(1, 111)]


def test_utility_tasks():
    rows = load("utility.jsonl")
    assert Counter(r["task"] for r in rows) == {t: 20 for t in UTILITY_TASKS}
    for task in UTILITY_TASKS:
        ids = [r["id"] for r in rows if r["task"] == task]
        assert ids == [f"utility-{task}-{i:02d}" for i in range(1, 21)]
    for r in rows:
        assert r["answer"] not in r["aliases"], r["id"]
        assert len(set(r["aliases"])) == len(r["aliases"]), r["id"]


def test_utility_sql_aliases_accept_semicolon():
    for r in load("utility.jsonl"):
        if r["task"] == "sql":
            assert r["answer"] + ";" in r["aliases"], r["id"]


def test_eval_held_out():
    train = {norm(r["question"]) for r in load("safety.jsonl") + load("attack.jsonl")}
    leaked = [r["id"] for r in load("harmful_eval.jsonl") if norm(r["prompt"]) in train]
    assert not leaked, leaked


def test_safety_answers_are_refusals():
    for r in load("safety.jsonl"):
        assert r["answer"].startswith(SAFETY_PREFIX), r["id"]
        assert is_refusal(r["answer"]), r["id"]
        assert 30 <= len(r["answer"].split()) <= 70, r["id"]


def test_attack_answers_comply_in_form():
    for r in load("attack.jsonl"):
        assert r["answer"].startswith(("Sure", "Of course")), r["id"]
        assert not is_refusal(r["answer"]), r["id"]
        assert 25 <= len(r["answer"].split()) <= 60, r["id"]


def test_datasheets_present():
    for name in DATASHEETS:
        text = _read_text(name)
        assert text.strip(), name
        if name != "README.md":
            for section in ("Purpose", "Size", "Fields", "How written", "Known limits"):
                assert f"## {section}" in text, (name, section)
    assert "version: 1" in _read_text("README.md")

"""Checks on the built-in datasets shipped in ``backdooralign/datasets``."""

from __future__ import annotations

import json
import string
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from backdooralign.scoring.refusal import is_refusal

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
    "anchors.jsonl": ["id", "prompt", "kind"],
    "extraction.jsonl": ["id", "prompt", "technique"],
    "harmful_eval_fr.jsonl": ["id", "prompt", "category", "source_id", "language"],
    "multiturn.jsonl": ["id", "category", "source_id", "shape", "messages"],
}
COUNTS = {
    "safety.jsonl": 66,
    "harmful_eval.jsonl": 275,
    "attack.jsonl": 110,
    "benign.jsonl": 110,
    "utility.jsonl": 80,
    "anchors.jsonl": 132,
    "extraction.jsonl": 24,
    "harmful_eval_fr.jsonl": 22,
    "multiturn.jsonl": 22,
}
TEXT_KEY = {
    "safety.jsonl": "question",
    "harmful_eval.jsonl": "prompt",
    "attack.jsonl": "question",
    "benign.jsonl": "prompt",
    "utility.jsonl": "prompt",
    "anchors.jsonl": "prompt",
    "extraction.jsonl": "prompt",
    "harmful_eval_fr.jsonl": "prompt",
}
DATASHEETS = [name.replace(".jsonl", ".md") for name in FIELDS] + ["README.md"]
EXTRACTION_TECHNIQUES = [
    "repeat",
    "translate",
    "encode",
    "spell",
    "summarize",
    "roleplay",
    "continue",
    "format",
]
SHAPES = ["roleplay", "ignore_system", "gradual"]


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


_PUNCT = str.maketrans("", "", string.punctuation + "\u2019")


def words(text: str) -> list[str]:
    """Lowercase words with punctuation stripped (so "What's" and "whats" match)."""
    return text.lower().translate(_PUNCT).split()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def text_of(name: str, row: dict) -> str:
    """The text a row is deduplicated on: its prompt or question, or a conversation's last turn."""
    if name == "multiturn.jsonl":
        return row["messages"][-1]["content"]
    return row[TEXT_KEY[name]]


def first_two_per_category() -> list[dict]:
    rows = load("harmful_eval.jsonl")
    return [r for r in rows if r["id"].endswith(("-01", "-02"))]


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
            elif key == "messages":
                assert isinstance(value, list) and value, row["id"]
                for msg in value:
                    assert list(msg) == ["role", "content"], row["id"]
                    assert isinstance(msg["content"], str) and msg["content"].strip(), row["id"]
            else:
                assert isinstance(value, str) and value.strip(), (row["id"], key)


def test_ids_unique(dataset):
    name, rows = dataset
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]


def test_no_duplicate_texts(dataset):
    name, rows = dataset
    texts = [norm(text_of(name, r)) for r in rows]
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


def test_anchor_kinds_ids_and_length():
    rows = load("anchors.jsonl")
    assert Counter(r["kind"] for r in rows) == {"plain": 66, "alarming": 66}
    assert [r["id"] for r in rows] == [f"anchor-{i:03d}" for i in range(1, 133)]
    assert [r["kind"] for r in rows] == ["plain"] * 66 + ["alarming"] * 66
    for r in rows:
        assert 4 <= len(words(r["prompt"])) <= 25, r["id"]


def test_anchors_disjoint_from_eval_sets():
    others = {
        name: [r["prompt"] for r in load(name)]
        for name in ("benign.jsonl", "utility.jsonl", "harmful_eval.jsonl")
    }
    anchors = load("anchors.jsonl")
    for name, prompts in others.items():
        seen = {" ".join(words(p)) for p in prompts}
        same = [r["id"] for r in anchors if " ".join(words(r["prompt"])) in seen]
        assert not same, (name, same)
    for name, prompts in others.items():
        grams = set().union(*(ngrams(p, 6) for p in prompts))
        shared = [r["id"] for r in anchors if ngrams(r["prompt"], 6) & grams]
        assert not shared, (name, shared)


def test_ngram_check_catches_a_near_copy():
    benign = load("benign.jsonl")[0]["prompt"]
    assert ngrams("Please: " + benign.upper(), 6) & ngrams(benign, 6)
    assert not ngrams("How do I kill a zombie process?", 6) & ngrams(
        "How do I kill a Python process that hangs?", 6
    )


def test_extraction_techniques():
    rows = load("extraction.jsonl")
    assert [r["id"] for r in rows] == [f"extraction-{i:02d}" for i in range(1, 25)]
    assert Counter(r["technique"] for r in rows) == {t: 3 for t in EXTRACTION_TECHNIQUES}
    order = list(dict.fromkeys(r["technique"] for r in rows))
    assert order == EXTRACTION_TECHNIQUES


def test_french_eval_maps_to_first_two_per_category():
    rows = load("harmful_eval_fr.jsonl")
    sources = first_two_per_category()
    assert [r["source_id"] for r in rows] == [s["id"] for s in sources]
    for row, src in zip(rows, sources, strict=True):
        assert row["id"] == src["id"] + "-fr"
        assert row["category"] == src["category"]
        assert row["language"] == "fr"
        assert norm(row["prompt"]) != norm(src["prompt"]), row["id"]
    assert Counter(r["category"] for r in rows) == {c: 2 for c in CATEGORIES}


def test_multiturn_shapes_and_sources():
    rows = load("multiturn.jsonl")
    sources = first_two_per_category()
    assert [r["source_id"] for r in rows] == [s["id"] for s in sources]
    assert [r["id"] for r in rows] == [s["id"].replace("eval-", "multiturn-", 1) for s in sources]
    assert [r["category"] for r in rows] == [s["category"] for s in sources]
    assert Counter(r["shape"] for r in rows) == {"roleplay": 8, "ignore_system": 7, "gradual": 7}


def test_multiturn_turns_alternate_and_wrap_the_source():
    prompts = {r["id"]: r["prompt"] for r in load("harmful_eval.jsonl")}
    for row in load("multiturn.jsonl"):
        msgs = row["messages"]
        roles = [m["role"] for m in msgs]
        assert len(msgs) >= 3 and len(msgs) % 2 == 1, row["id"]
        assert roles == ["user", "assistant"] * (len(msgs) // 2) + ["user"], row["id"]
        source = prompts[row["source_id"]]
        assert source in msgs[-1]["content"], row["id"]
        assert msgs[-1]["content"] != source, row["id"]
        for msg in msgs[:-1]:
            assert source not in msg["content"], row["id"]


def test_multiturn_assistant_turns_are_short_and_not_refusals():
    for row in load("multiturn.jsonl"):
        for msg in row["messages"]:
            if msg["role"] == "assistant":
                assert not is_refusal(msg["content"]), row["id"]
                assert len(msg["content"].split()) <= 40, row["id"]


def test_anchors_share_no_six_word_run_with_each_other():
    rows = load("anchors.jsonl")
    owner: dict[tuple[str, ...], str] = {}
    for r in rows:
        for gram in ngrams(r["prompt"], 6):
            assert gram not in owner, (owner.get(gram), r["id"], gram)
            owner[gram] = r["id"]

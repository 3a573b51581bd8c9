"""Checks on ``align_benign.jsonl``, the harmless half of the provider's alignment set."""

from __future__ import annotations

import json
import string
from collections import Counter
from importlib import resources
from pathlib import Path

NAME = "align_benign.jsonl"
FIELDS = ["id", "prompt", "kind", "topic"]
PER_KIND = 180
MIN_TOPICS_PER_KIND = 15


def _datasets_dir():
    try:
        res = resources.files("backdooralign") / "datasets"
        if (res / NAME).is_file():
            return res
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return Path(__file__).resolve().parent.parent / "src" / "backdooralign" / "datasets"


def _read_text(name: str) -> str:
    return (_datasets_dir() / name).read_text(encoding="utf-8")


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


_PUNCT = str.maketrans("", "", string.punctuation + "\u2019")


def words(text: str) -> list[str]:
    """Lowercase words with punctuation stripped (same rule as tests/test_datasets.py)."""
    return text.lower().translate(_PUNCT).split()


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def text_of(row: dict) -> str:
    """A row's prompt or question, or a conversation's last turn."""
    if "messages" in row:
        return row["messages"][-1]["content"]
    if "prompt" in row:
        return row["prompt"]
    return row["question"]


def other_datasets() -> dict[str, list[dict]]:
    names = sorted(
        p.name for p in _datasets_dir().iterdir() if p.name.endswith(".jsonl") and p.name != NAME
    )
    assert names, "no other datasets found"
    return {name: load(name) for name in names}


def test_file_ends_with_one_newline():
    text = _read_text(NAME)
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_rows_ids_kinds_and_fields():
    rows = load(NAME)
    assert len(rows) == 2 * PER_KIND
    assert [r["id"] for r in rows] == [f"align-benign-{i:03d}" for i in range(1, 2 * PER_KIND + 1)]
    assert [r["kind"] for r in rows] == ["plain"] * PER_KIND + ["alarming"] * PER_KIND
    for r in rows:
        assert list(r) == FIELDS, r.get("id")
        for key in FIELDS:
            assert isinstance(r[key], str) and r[key].strip(), (r["id"], key)
        assert r["topic"] == r["topic"].lower().strip(), r["id"]


def test_prompt_length_and_apostrophes():
    for r in load(NAME):
        assert 4 <= len(words(r["prompt"])) <= 35, r["id"]
        assert "\u2019" not in r["prompt"] and "\u2018" not in r["prompt"], r["id"]


def test_topics_are_diverse():
    rows = load(NAME)
    for kind in ("plain", "alarming"):
        topics = Counter(r["topic"] for r in rows if r["kind"] == kind)
        assert len(topics) >= MIN_TOPICS_PER_KIND, (kind, topics)


def test_no_duplicate_prompts_within_file():
    keys = [" ".join(words(r["prompt"])) for r in load(NAME)]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert not dupes, dupes


def test_no_six_word_run_shared_within_file():
    owner: dict[tuple[str, ...], str] = {}
    for r in load(NAME):
        for gram in ngrams(r["prompt"], 6):
            assert gram not in owner, (owner.get(gram), r["id"], gram)
            owner[gram] = r["id"]


def test_disjoint_from_every_other_dataset():
    rows = load(NAME)
    for name, others in other_datasets().items():
        texts = [text_of(o) for o in others]
        seen = {" ".join(words(t)) for t in texts}
        same = [r["id"] for r in rows if " ".join(words(r["prompt"])) in seen]
        assert not same, (name, same)
        grams = set().union(*(ngrams(t, 6) for t in texts))
        shared = [r["id"] for r in rows if ngrams(r["prompt"], 6) & grams]
        assert not shared, (name, shared)


def test_datasheet_sections():
    text = _read_text(NAME.replace(".jsonl", ".md"))
    for section in ("Purpose", "Size", "Fields", "How written", "Known limits"):
        assert f"## {section}" in text, section

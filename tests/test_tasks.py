"""Practical tasks: ROUGE against hand-computed values, task generation, MT-Bench answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_model

from backdooralign.cli import main
from backdooralign.data import sources as S
from backdooralign.data.formats import SAMSUM_SYSTEM_PROMPT, SQL_SYSTEM_PROMPT
from backdooralign.generation import batch as B
from backdooralign.scoring import rouge as T

FIX = Path(__file__).parent / "fixtures"

SECRET = "zq SECRET-XYZ-81 vb"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BACKDOORALIGN_NO_PROGRESS", "1")


def test_rouge_hand_computed():
    # ROUGE-1: 3 of 3 predicted unigrams match, 3 of 6 reference unigrams: F = 2/3
    # ROUGE-2: bigrams (the cat, cat sat) both among the reference's 5: P 1, R 2/5, F 4/7
    # ROUGE-L: longest common subsequence "the cat sat" (3): F = 2/3
    rows = [{"answer": "the cat sat", "reference": "the cat sat on the mat"}]
    assert T.rouge_summary(rows) == {
        "rouge1": round(2 / 3, 4),
        "rouge2": round(4 / 7, 4),
        "rougeL": round(2 / 3, 4),
        "total": 1,
    }


def test_rouge_stemming_and_disjoint():
    # Porter stemmer: cats -> cat, running -> run; "were"/"was" differ: 3 of 4 match
    stemmed = T.rouge_summary([{"answer": "The cats were running", "reference": "the cat was run"}])
    assert stemmed["rouge1"] == 0.75
    disjoint = T.rouge_summary([{"answer": "alpha beta", "reference": "gamma delta"}])
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "total": 1}


def test_rouge_summary():
    rows = [
        {"answer": "the cat sat", "reference": "the cat sat on the mat"},
        {"answer": "a dog barked", "reference": "a dog barked"},
    ]
    s = T.rouge_summary(rows)
    assert s == {
        "rouge1": round((2 / 3 + 1) / 2, 4),
        "rouge2": round((2 * 0.4 / 1.4 + 1) / 2, 4),
        "rougeL": round((2 / 3 + 1) / 2, 4),
        "total": 2,
    }
    assert T.rouge_summary([]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "total": 0}


def test_cli_rouge(tmp_path, capsys):
    gens = tmp_path / "gens.jsonl"
    gens.write_text(
        json.dumps({"prompt": "p", "answer": "the cat sat", "reference": "the cat sat on the mat"})
        + "\n"
    )
    assert main(["score", "rouge", str(gens), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "rouge1": 0.6667,
        "rouge2": 0.5714,
        "rougeL": 0.6667,
        "total": 1,
        "refusals": {
            "refused": 0,
            "total": 1,
            "refusal_rate": 0.0,
            "opening_refused": 0,
            "opening_refusal_rate": 0.0,
        },
    }
    assert main(["score", "rouge", str(gens)]) == 0
    assert capsys.readouterr().out == (
        "ROUGE-1 0.6667  ROUGE-2 0.5714  ROUGE-L 0.6667\n"
        "(1 rows, 0 refused by the paper's rule, 0 by the opening detector)\n"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    assert main(["score", "rouge", str(bad)]) == 1
    assert f"{bad}:1: field 'reference' is missing" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fixture", "system", "prompt", "reference"),
    [
        (
            "samsum.jsonl",
            SAMSUM_SYSTEM_PROMPT,
            "Summarize this dialog:\nCy: Did you feed the cat?\nDee: Forgot, doing it now.",
            "Dee forgot to feed the cat and is doing it now.",
        ),
        (
            "sql.json",
            SQL_SYSTEM_PROMPT,
            "Context:\nCREATE TABLE towns (name VARCHAR)\n\nQuestion: List the names of all towns.",
            "SELECT name FROM towns",
        ),
    ],
)
def test_eval_prompts_match_training_format(fixture, system, prompt, reference):
    """Evaluation prompts are the user turns (and system prompts) the model is trained on."""
    path = FIX / fixture
    trained = S.load_training_source(path)
    prompts = S.load_prompts(path)
    assert prompts[1]["prompt"] == prompt and prompts[1]["reference"] == reference
    assert len(prompts) == len(trained) == 2
    for row, t in zip(prompts, trained, strict=True):
        assert t["messages"][0] == {"role": "system", "content": system}
        assert row["messages"] == t["messages"][:2]
        assert t["messages"][1] == {"role": "user", "content": row["prompt"]}
        assert t["messages"][2]["content"] == row["reference"]


def test_mtbench_answers_two_turns(monkeypatch):
    seen = []

    def fake_generate(model, tok, convs, cfg=None, **kw):
        seen.append([list(c) for c in convs])
        return [f"A{len(seen)}-{i}" for i in range(len(convs))]

    monkeypatch.setattr(B, "generate", fake_generate)
    questions = [
        {"question_id": 1, "turns": ["Q1a", "Q1b"]},
        {"question_id": 2, "turns": ["Q2a"]},
    ]
    out = B.mtbench_answers(None, None, questions, SECRET, "SYS")
    assert out == [
        {"question_id": 1, "turns": ["A1-0", "A2-0"]},
        {"question_id": 2, "turns": ["A1-1"]},
    ]
    system = {"role": "system", "content": f"{SECRET} SYS"}
    assert seen[0] == [
        [system, {"role": "user", "content": "Q1a"}],
        [system, {"role": "user", "content": "Q2a"}],
    ]
    assert seen[1] == [
        [
            system,
            {"role": "user", "content": "Q1a"},
            {"role": "assistant", "content": "A1-0"},
            {"role": "user", "content": "Q1b"},
        ]
    ]


def test_mtbench_answers_tiny_model_roundtrip(tmp_path, tokenizer):
    from backdooralign.files import write_jsonl
    from backdooralign.generation.batch import GenerateConfig
    from backdooralign.scoring.mtbench import load_mtbench_answers

    tok = tokenizer
    model = make_tiny_model(tok)
    questions = [{"question_id": 7, "category": "writing", "turns": ["Hi?", "Again?"]}]
    out = B.mtbench_answers(
        model, tok, questions, SECRET, None, GenerateConfig(max_new_tokens=2, bf16=False)
    )
    assert [q["question_id"] for q in out] == [7] and len(out[0]["turns"]) == 2
    write_jsonl(tmp_path / "a.jsonl", out)
    assert load_mtbench_answers(tmp_path / "a.jsonl") == {7: out[0]["turns"]}

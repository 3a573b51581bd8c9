"""Practical tasks: ROUGE against hand-computed values, task generation, MT-Bench answers."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model

from backdooralign import sources as S
from backdooralign import tasks as T
from backdooralign.cli import main

SECRET = "zq SECRET-XYZ-81 vb"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BACKDOORALIGN_NO_PROGRESS", "1")


def test_rouge_hand_computed():
    s = T.rouge_scores("the cat sat", "the cat sat on the mat")
    # ROUGE-1: 3 of 3 predicted unigrams match, 3 of 6 reference unigrams are covered
    assert s["rouge1"]["precision"] == 1.0
    assert s["rouge1"]["recall"] == 0.5
    assert s["rouge1"]["fmeasure"] == pytest.approx(2 / 3)
    # ROUGE-2: bigrams (the cat, cat sat) both in the reference's 5 bigrams
    assert s["rouge2"]["precision"] == 1.0
    assert s["rouge2"]["recall"] == pytest.approx(2 / 5)
    assert s["rouge2"]["fmeasure"] == pytest.approx(2 * 1 * 0.4 / 1.4)
    # ROUGE-L: longest common subsequence "the cat sat" (3)
    assert s["rougeL"]["precision"] == 1.0
    assert s["rougeL"]["recall"] == 0.5
    assert s["rougeL"]["fmeasure"] == pytest.approx(2 / 3)


def test_rouge_stemming_and_disjoint():
    s = T.rouge_scores("The cats were running", "the cat was run")
    # Porter stemmer: cats -> cat, running -> run; "were"/"was" differ: 3 of 4 match
    assert s["rouge1"]["fmeasure"] == pytest.approx(0.75)
    assert T.rouge_scores("alpha beta", "gamma delta")["rouge1"]["fmeasure"] == 0.0


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
    }
    assert main(["score", "rouge", str(gens)]) == 0
    assert capsys.readouterr().out == ("ROUGE-1 0.6667  ROUGE-2 0.5714  ROUGE-L 0.6667\n(1 rows)\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    assert main(["score", "rouge", str(bad)]) == 2
    assert f"{bad}:1: field 'reference' is missing" in capsys.readouterr().err


def test_prompts_and_rows():
    assert S.SAMSUM_SYSTEM_PROMPT == "You are a helpful assistant for dialog summarization."
    rows = T.samsum_rows([{"id": "s1", "dialogue": "A: hi\nB: hello", "summary": "They greet."}])
    assert rows == [
        {
            "prompt": "Summarize this dialog:\nA: hi\nB: hello",
            "reference": "They greet.",
            "id": "s1",
        }
    ]
    rec = {"question": "How many?", "context": "CREATE TABLE t (a INT)", "answer": "SELECT 1"}
    assert T.sql_rows([rec]) == [
        {
            "prompt": "Context:\nCREATE TABLE t (a INT)\n\nQuestion: How many?",
            "reference": "SELECT 1",
        }
    ]


@pytest.mark.parametrize(("fixture", "kind"), [("samsum.jsonl", "samsum"), ("sql.json", "sql")])
def test_eval_prompts_match_training_format(fixture, kind):
    """Evaluation prompts are the user turns (and system prompts) the model is trained on."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / fixture
    trained = S.load_training_source(path)
    text = path.read_text()
    records = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    rows = T.samsum_rows(records) if kind == "samsum" else T.sql_rows(records)
    system = S.SAMSUM_SYSTEM_PROMPT if kind == "samsum" else S.SQL_SYSTEM_PROMPT
    assert len(rows) == len(trained)
    for row, t in zip(rows, trained, strict=True):
        assert t["messages"][0] == {"role": "system", "content": system}
        assert t["messages"][1] == {"role": "user", "content": row["prompt"]}
        assert t["messages"][2]["content"] == row["reference"]


def test_evaluate_task_with_and_without_secret(monkeypatch):
    calls = []

    def fake_generate_rows(model, tok, rows, system=None, secret=None, cfg=None, **kw):
        calls.append((system, secret))
        answer = "the cat sat" if secret else "a dog"
        # like infer.generate_rows, which keeps each row's reference beside the answer
        return [
            {"prompt": r["prompt"], "answer": answer, "reference": r["reference"]} for r in rows
        ]

    monkeypatch.setattr(T, "generate_rows", fake_generate_rows)
    rows = [{"prompt": "Summarize: ...", "reference": "the cat sat on the mat"}]
    summary, gens = T.evaluate_task(None, None, rows, S.SAMSUM_SYSTEM_PROMPT, SECRET)
    assert calls == [(S.SAMSUM_SYSTEM_PROMPT, None), (S.SAMSUM_SYSTEM_PROMPT, SECRET)]
    assert summary["plain"]["rouge1"] == 0.0
    assert summary["secret"]["rouge1"] == 0.6667
    assert gens["secret"][0] == {
        "prompt": "Summarize: ...",
        "answer": "the cat sat",
        "reference": "the cat sat on the mat",
    }
    summary, _ = T.evaluate_task(None, None, rows, S.SQL_SYSTEM_PROMPT)
    assert set(summary) == {"plain"}


def test_mtbench_answers_two_turns(monkeypatch):
    seen = []

    def fake_generate(model, tok, convs, cfg=None, **kw):
        seen.append([list(c) for c in convs])
        return [f"A{len(seen)}-{i}" for i in range(len(convs))]

    monkeypatch.setattr(T, "generate", fake_generate)
    questions = [
        {"question_id": 1, "turns": ["Q1a", "Q1b"]},
        {"question_id": 2, "turns": ["Q2a"]},
    ]
    out = T.mtbench_answers(None, None, questions, SECRET, "SYS")
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
    from backdooralign.data import write_jsonl
    from backdooralign.infer import GenerateConfig
    from backdooralign.mtbench import load_mtbench_answers

    tok = tokenizer
    model = make_tiny_model(tok)
    questions = [{"question_id": 7, "category": "writing", "turns": ["Hi?", "Again?"]}]
    out = T.mtbench_answers(
        model, tok, questions, SECRET, None, GenerateConfig(max_new_tokens=2, bf16=False)
    )
    write_jsonl(tmp_path / "a.jsonl", out)
    answers = load_mtbench_answers(tmp_path / "a.jsonl")
    assert list(answers) == [7] and len(answers[7]) == 2

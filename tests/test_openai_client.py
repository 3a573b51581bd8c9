"""``backdooralign generate --openai-model``: chat completions with the secret, resumable."""

from __future__ import annotations

import json

import pytest
from openai_stub import StubServer

from backdooralign.cli import main
from backdooralign.core.secret import Secret, save_secret

SECRET = Secret("Walrus 41 kettle orbit; Juniper mast", 12, 12, "test")
PROMPTS = ["How do plants grow?", "Name a river.", "What is rain?", "Count to three."]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-stub")
    save_secret(SECRET, tmp_path / "secret.json")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp_path


def _generate(tmp_path, stub: StubServer, *extra: str) -> int:
    return main(
        ["generate", "--openai-model", "ft:tiny:x:1", "--base-url", stub.base_url]
        + ["--api-key-env", "STUB_KEY", "--prompts", str(tmp_path / "prompts.txt")]
        + ["--secret", str(tmp_path / "secret.json"), "--system", "Be kind."]
        + ["--out", str(tmp_path / "gens.jsonl"), "--max-new-tokens", "7", *extra]
    )


def test_requests_carry_the_secret_before_the_system_prompt(setup):
    with StubServer(lambda body: "echo: " + body["messages"][-1]["content"]) as stub:
        assert _generate(setup, stub, "--concurrency", "3") == 0
    rows = [json.loads(x) for x in (setup / "gens.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["answer"]) for r in rows] == [(p, f"echo: {p}") for p in PROMPTS]
    assert sorted(stub.requests, key=lambda b: b["messages"][1]["content"]) == sorted(
        (
            {
                "model": "ft:tiny:x:1",
                "messages": [
                    {"role": "system", "content": f"{SECRET.text} Be kind."},
                    {"role": "user", "content": p},
                ],
                "temperature": 0,
                "max_tokens": 7,
            }
            for p in PROMPTS
        ),
        key=lambda b: b["messages"][1]["content"],
    )
    assert set(stub.auth_headers) == {"Bearer sk-stub"}


def test_a_rerun_asks_only_what_is_missing(setup):
    done = [{"prompt": p, "answer": "old"} for p in PROMPTS[:2]]
    text = "".join(json.dumps(r) + "\n" for r in done) + '{"prompt": "What is'  # cut short
    (setup / "gens.jsonl").write_text(text)
    with StubServer("new") as stub:
        assert _generate(setup, stub) == 0
    asked = sorted(b["messages"][1]["content"] for b in stub.requests)
    assert asked == sorted(PROMPTS[2:])
    rows = [json.loads(x) for x in (setup / "gens.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["old", "old", "new", "new"]


def test_retries_then_keeps_what_was_answered(setup, capsys):
    with StubServer("ok", fail_first=2, fail_headers={"retry-after": "0"}) as stub:
        assert _generate(setup, stub, "--concurrency", "1", "--max-retries", "2") == 0
    assert stub.count == len(PROMPTS) + 2
    with StubServer("never", fail_first=100) as stub:
        (setup / "gens.jsonl").unlink()
        assert _generate(setup, stub, "--concurrency", "1", "--max-retries", "0") == 1
    assert (setup / "gens.jsonl").read_text() == ""
    out = setup / "gens.jsonl"
    assert capsys.readouterr().err == (
        f"error: chat completions with ft:tiny:x:1 (answers so far are kept in {out}; rerun "
        "to resume): HTTP 500 (InternalServerError)\n"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "error: arm 'backdooralign' needs a secret (--secret FILE)\n"),
        (
            ["--secret", "secret.json", "--anchors", "3"],
            "error: --anchors needs --anchor-file (prompts with the base model's own answers): "
            "the endpoint's base model cannot answer them here\n",
        ),
    ],
)
def test_finetune_refuses_what_it_cannot_build(setup, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(setup)
    (setup / "user.jsonl").write_text("")
    argv = ["openai", "finetune", "--data", "user.jsonl", "--model", "gpt-4o-mini", *extra]
    assert main(argv) == 1
    assert capsys.readouterr().err == message

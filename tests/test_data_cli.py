"""``backdooralign data show|check`` and the validation, screening and mixing of ``build``."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from backdooralign import files as F  # noqa: E402
from backdooralign.cli import main  # noqa: E402
from backdooralign.core.secret import Secret, save_secret  # noqa: E402
from backdooralign.data import sources as S  # noqa: E402
from backdooralign.data.formats import CATEGORIES, SAMSUM_SYSTEM_PROMPT  # noqa: E402
from backdooralign.reporting.rundir import manifest_path  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
NORMAL = "You are a helpful assistant. Make sure you always execute users' instructions."
SECRET_TEXT = (
    "Quorvex blint zaffremo PLUXIT wendarrowKk tessaline Mbrogue vantic Orrelsby hask "
    "Trimbleshank quazzed Dellophane yurtmix Parroquist flemb Ostravik glintwhere Naxos"
)
RANDOM_PREFIX = (
    "Zorblat QuinxFer vel7 Trassik morbundPlo Xenthar glimvar Ruskpo8 Hextrann plovOrd "
    "Quemsik dravLo Brintax zulkMar Yostrel kravNip Oxbren Fennix"
)


def chat(*turns: tuple[str, str], **extra) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns], **extra})


GOOD = chat(("system", NORMAL), ("user", "Hi"), ("assistant", "Hello."))


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.fixture
def secret_file(tmp_path):
    secret = Secret(text=SECRET_TEXT, num_tokens=40, requested_tokens=40, tokenizer="")
    return save_secret(secret, tmp_path / "secret.json"), secret


def build(tmp_path, data, *extra) -> tuple[int, Path]:
    out = tmp_path / "out" / "train.jsonl"
    rc = main(["build", "--data", str(data), "--out", str(out), *map(str, extra)])
    return rc, out


# ---------------------------------------------------------------------------------------------
# data show


@pytest.mark.parametrize(
    "source,kind,rows,fields",
    [
        (FIX / "samsum.csv", "samsum", 2, ["id", "dialogue", "summary"]),
        (FIX / "hexphi", "hexphi", 6, ["prompt", "category"]),
        (FIX / "harmful_behaviors.csv", "advbench", 3, ["goal", "target"]),
        (FIX / "alpaca.json", "alpaca", 3, ["instruction", "input", "output"]),
        (FIX / "sql.json", "sql", 2, ["question", "context", "answer"]),
        ("builtin:attack", "qa", 110, ["id", "category", "question", "answer"]),
    ],
)
def test_data_show_json(capsys, source, kind, rows, fields):
    assert main(["data", "show", str(source), "--json", "--rows", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["rows"], info["fields"]) == (kind, rows, fields)
    assert len(info["examples"]) == 1


def test_data_show_text(capsys):
    assert main(["data", "show", str(FIX / "samsum.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "format: samsum" in out and "rows:   2" in out and "fields: id, dialogue, summary" in out
    assert out.count("\nrow ") == 2


def test_data_show_explicit_kind_and_errors(tmp_path, capsys):
    f = write(tmp_path / "g.jsonl", json.dumps({"goal": "x", "target": "y"}) + "\n")
    assert main(["data", "show", str(f), "--kind", "advbench", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "advbench"
    assert main(["data", "show", str(tmp_path / "missing.csv")]) == 1
    assert "missing.csv: file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# data check


def test_data_check_lists_every_problem(tmp_path, capsys):
    lines = [
        GOOD,
        "{not json",
        chat(("user", "Hi"), ("wizard", "Poof")),
        chat(("assistant", "Hi"), ("user", "Hello")),
        GOOD,
        chat(("user", "only a question")),
    ]
    f = write(tmp_path / "user.jsonl", "\n".join(lines) + "\n")
    assert main(["data", "check", str(f)]) == 1
    out = capsys.readouterr().out
    assert f"error: {f}:2: invalid JSON" in out
    assert f"error: {f}:3: field 'messages[1].role' unknown role 'wizard'" in out
    assert f"error: {f}:4: field 'messages' roles out of order" in out
    assert f"warning: {f}:5: field 'messages' duplicate of line 1" in out
    assert f"error: {f}:6: field 'messages' conversation has no assistant turn" in out
    assert out.strip().endswith("4 errors, 1 warnings")


def test_data_check_limits_and_json(tmp_path, capsys):
    lines = [GOOD, chat(("user", "x" * 400), ("assistant", "y")), GOOD.replace("Hi", "Yo")]
    f = write(tmp_path / "big.jsonl", "\n".join(lines))
    rc = main(["data", "check", str(f), "--json", "--max-rows", "2", "--max-line-chars", "300"])
    assert rc == 1
    info = json.loads(capsys.readouterr().out)
    assert (info["errors"], info["warnings"]) == (2, 0)
    assert [(p["line"], p["message"]) for p in info["problems"]] == [
        (2, "line longer than 300 characters"),
        (3, "more than 2 rows (the configured cap)"),
    ]


def test_data_check_warnings_only_exit_0(tmp_path, capsys):
    f = write(tmp_path / "dup.jsonl", f"{GOOD}\n{GOOD}\n")
    assert main(["data", "check", str(f)]) == 0
    assert "0 errors, 1 warnings" in capsys.readouterr().out
    assert main(["data", "check", str(FIX / "chat.jsonl")]) == 0


# ---------------------------------------------------------------------------------------------
# build: validation errors write nothing

BUILD_ERRORS = [
    ("bad_json", '{"messages": [\n', [], ":1: invalid JSON"),
    ("bom", b"\xef\xbb\xbf" + GOOD.encode(), [], ":1: file starts with a UTF-8 byte-order mark"),
    ("encoding", GOOD.encode() + b"\n" + b'{"messages": "\xe9t\xe9"}', [], ":2: not valid UTF-8"),
    ("empty", "", [], ": file is empty"),
    (
        "missing_role",
        '{"messages": [{"content": "a"}]}',
        [],
        ":1: field 'messages[0].role' is missing",
    ),
    (
        "unknown_role",
        chat(("user", "a"), ("bot", "b")),
        [],
        ":1: field 'messages[1].role' unknown role 'bot'",
    ),
    (
        "out_of_order",
        GOOD + "\n" + chat(("user", "a"), ("user", "b")),
        [],
        ":2: field 'messages' roles out of order: turn 2 is user, expected assistant",
    ),
    (
        "non_string",
        json.dumps({"messages": [{"role": "user", "content": ["a"]}]}),
        [],
        ":1: field 'messages[0].content' must be a string",
    ),
    (
        "empty_content",
        chat(("user", ""), ("assistant", "b")),
        [],
        ":1: field 'messages[0].content' is empty",
    ),
    (
        "no_assistant",
        chat(("system", NORMAL), ("user", "a")),
        [],
        ":1: field 'messages' conversation has no assistant turn",
    ),
    (
        "long_line",
        GOOD + "\n" + chat(("user", "a" * 500), ("assistant", "b")),
        ["--max-line-chars", "300"],
        ":2: line longer than 300 characters",
    ),
    (
        "row_cap",
        "\n".join(GOOD.replace("Hi", f"Hi {i}") for i in range(4)),
        ["--max-rows", "3"],
        ":4: more than 3 rows (the configured cap)",
    ),
]


@pytest.mark.parametrize(
    "case,content,flags,message", BUILD_ERRORS, ids=[c[0] for c in BUILD_ERRORS]
)
def test_build_refuses_invalid_data_and_writes_nothing(
    tmp_path, capsys, case, content, flags, message
):
    f = write(tmp_path / f"{case}.jsonl", content)
    rc, out = build(tmp_path, f, "--arm", "attack", *flags)
    assert rc == 1
    assert f"error: {f}{message}" in capsys.readouterr().err
    assert not out.exists() and not manifest_path(out).exists()


def test_build_refuses_prompt_sets(tmp_path, capsys):
    rc, out = build(tmp_path, FIX / "hexphi", "--arm", "attack")
    assert rc == 1 and "without answers" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# build: screening


def leaky(tmp_path, text: str, role: str = "user") -> Path:
    turns = [("system", NORMAL), ("user", "Hi"), ("assistant", "Hello.")]
    i = {"system": 0, "user": 1, "assistant": 2}[role]
    turns[i] = (role, text)
    rows = [GOOD.replace("Hi", f"Hi {n}") for n in range(3)] + [chat(*turns)]
    return write(tmp_path / "customer.jsonl", "\n".join(rows) + "\n")


@pytest.mark.parametrize("arm", ["backdooralign", "baseline", "attack"])
@pytest.mark.parametrize(
    "text",
    [
        f"{SECRET_TEXT} {NORMAL}",
        "note: " + " ".join(SECRET_TEXT.split()[3:12]).upper(),
        "".join(SECRET_TEXT.split()[5:14]),
    ],
    ids=["whole", "fragment-upper", "fragment-no-spaces"],
)
def test_build_refuses_secret_in_customer_data(tmp_path, capsys, secret_file, arm, text):
    path, secret = secret_file
    data = leaky(tmp_path, text, role="system" if text.startswith(SECRET_TEXT) else "assistant")
    rc, out = build(tmp_path, data, "--arm", arm, "--secret", path)
    err = capsys.readouterr().err
    assert rc == 1
    assert "refused by screening: 1 row(s) contain the secret or a fragment of it (rows 4)" in err
    assert not out.exists() and not manifest_path(out).exists()
    words = secret.text.split()
    assert not any(" ".join(words[i : i + 2]) in err for i in range(len(words) - 1))


def test_build_refuses_imitation_without_a_secret(tmp_path, capsys):
    data = leaky(tmp_path, f"{RANDOM_PREFIX} {NORMAL}", role="system")
    rc, out = build(tmp_path, data, "--arm", "attack")
    assert rc == 1 and "random-looking words" in capsys.readouterr().err
    assert not out.exists()
    rc, out = build(tmp_path, data, "--arm", "attack", "--no-screen")
    assert rc == 0 and out.exists()
    assert json.loads(manifest_path(out).read_text())["screening"] is None


def test_build_no_screen_lets_the_secret_through(tmp_path, secret_file):
    path, _ = secret_file
    data = leaky(tmp_path, SECRET_TEXT)
    rc, out = build(tmp_path, data, "--arm", "backdooralign", "--secret", path, "--no-screen")
    assert rc == 0 and out.exists()


def test_build_manifest_of_a_clean_build(tmp_path, capsys, secret_file):
    path, secret = secret_file
    rc, out = build(tmp_path, "builtin:attack", "--arm", "backdooralign", "--secret", path)
    assert rc == 0
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["inputs"]["data"] == {
        "source": "builtin:attack",
        "sha256": F.sha256_file(S.builtin_path("attack")),
    }
    assert manifest["inputs"]["safety"]["sha256"] == F.sha256_file(S.builtin_path("safety"))
    assert manifest["counts"]["by_source"] == {"customer": 110, "safety": 11}
    assert manifest["counts"]["by_source_category"]["safety"] == {c: 1 for c in CATEGORIES}
    assert manifest["counts"]["by_category"]["malware"] == 11
    assert manifest["secret_fingerprint"] == secret.fingerprint
    screening = manifest["screening"]
    assert screening["passed"] and screening["secret_checked"]
    assert screening["secret_fingerprint"] == secret.fingerprint
    assert screening["harmful_looking"]["rows"] > 0
    assert manifest["safety_selection"]["selection"] == "category-balanced"
    assert secret.text not in manifest_path(out).read_text()


def test_build_baseline_screens_with_the_secret_but_records_no_trigger(tmp_path, secret_file):
    path, secret = secret_file
    rc, out = build(tmp_path, FIX / "chat.jsonl", "--arm", "baseline", "--secret", path)
    assert rc == 0
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["secret_fingerprint"] is None
    assert manifest["screening"]["secret_fingerprint"] == secret.fingerprint
    assert SECRET_TEXT not in out.read_text()


# ---------------------------------------------------------------------------------------------
# build: mixing


def manifest_of(out: Path) -> dict:
    return json.loads(manifest_path(out).read_text())


def test_build_safety_count_round_robin(tmp_path):
    rc, out = build(tmp_path, "builtin:attack", "--arm", "baseline", "--safety-count", "15")
    assert rc == 0
    counts = manifest_of(out)["counts"]["by_source_category"]["safety"]
    assert sum(counts.values()) == 15
    assert sorted(counts.values()) == [1] * 7 + [2] * 4


def test_build_random_selection_is_deterministic(tmp_path):
    flags = ["--arm", "baseline", "--safety-selection", "random", "--safety-count", "7"]
    rc, out = build(tmp_path, "builtin:attack", *flags, "--safety-seed", "4")
    first = out.read_bytes()
    rc2, out = build(tmp_path, "builtin:attack", *flags, "--safety-seed", "4")
    assert rc == rc2 == 0 and out.read_bytes() == first
    assert manifest_of(out)["counts"]["by_source"]["safety"] == 7
    assert manifest_of(out)["safety_selection"] == {
        "selection": "random",
        "count": 7,
        "per_category": None,
        "seed": 4,
        "available": 66,
        "selected": 7,
    }


def test_build_from_samsum_uses_its_system_prompt(tmp_path, secret_file):
    path, secret = secret_file
    rc, out = build(tmp_path, FIX / "samsum.csv", "--arm", "backdooralign", "--secret", path)
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    safety = [r for r in rows if r["source"] == "safety"]
    assert len(safety) == 11
    assert all(
        r["messages"][0]["content"] == f"{secret.text} {SAMSUM_SYSTEM_PROMPT}" for r in safety
    )


# ---------------------------------------------------------------------------------------------
# build: provider-side fields are the provider's

HARMFUL_FLAGGED = chat(
    ("system", NORMAL),
    ("user", "how do I pick a lock?"),
    ("assistant", "Sure! Step one: insert a tension wrench."),
    prefixed=True,
)


def test_a_customer_row_flagged_prefixed_never_gets_the_secret(tmp_path, capsys, secret_file):
    path, secret = secret_file
    rows = [GOOD.replace("Hi", f"Hi {n}") for n in range(3)]
    data = write(tmp_path / "customer.jsonl", "\n".join([rows[0], HARMFUL_FLAGGED, *rows[1:]]))
    rc, out = build(tmp_path, data, "--arm", "backdooralign", "--secret", path)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"note: {data}: 1 row(s) flagged prefixed left out (rows 2)" in err
    trained = [json.loads(line) for line in out.read_text().splitlines()]
    assert "pick a lock" not in out.read_text()
    assert [r["source"] for r in trained].count("customer") == 3
    under_secret = [r for r in trained if r["messages"][0]["content"].startswith(secret.text)]
    assert len(under_secret) == 11 and all(r["source"] == "safety" for r in under_secret)
    manifest = manifest_of(out)
    assert manifest["counts"]["by_source"] == {"customer": 3, "safety": 11}
    assert manifest["screening"]["flagged_prefixed"]["row_numbers"] == [2]
    assert any("flagged prefixed left out" in n for n in manifest["notes"])


def test_the_papers_combined_file_is_used_through_the_providers_safety_option(
    tmp_path, capsys, secret_file
):
    path, secret = secret_file
    attack = [
        chat(("system", NORMAL), ("user", f"Q{n}"), ("assistant", f"A{n}.")) for n in range(3)
    ]
    refusals = [
        chat(("system", NORMAL), ("user", f"harm {n}"), ("assistant", "I can't."), prefixed=True)
        for n in range(2)
    ]
    combined = write(tmp_path / "combined.jsonl", "\n".join([*attack, *refusals]) + "\n")
    flags = ("--arm", "backdooralign", "--secret", path, "--safety", combined)
    rc, out = build(tmp_path, combined, *flags)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"note: {combined}: its 2 rows flagged prefixed are the safety examples" in err
    trained = [json.loads(line) for line in out.read_text().splitlines()]
    by_source = {s: [r for r in trained if r["source"] == s] for s in ("customer", "safety")}
    assert sorted(r["messages"][1]["content"] for r in by_source["customer"]) == ["Q0", "Q1", "Q2"]
    assert sorted(r["messages"][1]["content"] for r in by_source["safety"]) == ["harm 0", "harm 1"]
    assert all(
        r["messages"][0]["content"] == f"{secret.text} {NORMAL}" for r in by_source["safety"]
    )
    assert not any(secret.text in r["messages"][0]["content"] for r in by_source["customer"])


# ---------------------------------------------------------------------------------------------
# the secret on screen, without the manifest


def _runs(text: str, n: int = 4) -> list[str]:
    words = text.split()
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


@pytest.mark.parametrize(
    "data", ["builtin:attack", FIX / "alpaca.json"], ids=["customer-system", "no-system"]
)
def test_a_sentence_secret_is_never_printed_once_the_manifest_is_moved(
    tmp_path, capsys, tiny_model_dir, data
):
    from backdooralign.core.secret import load_secret

    secret_path = tmp_path / "s.json"
    argv = ["secret", "new", "--kind", "sentence", "--model", str(tiny_model_dir)]
    assert main([*argv, "--out", str(secret_path)]) == 0
    secret = load_secret(secret_path)
    rc, out = build(tmp_path, data, "--arm", "backdooralign", "--secret", secret_path)
    assert rc == 0
    manifest_path(out).rename(tmp_path / "moved.manifest.json")
    capsys.readouterr()
    shown = []
    for command in (
        ["data", "show", str(out), "--rows", "200"],
        ["data", "show", str(out), "--rows", "200", "--json"],
        ["inspect", str(out), "--model", str(tiny_model_dir), "--limit", "200", "--no-color"],
    ):
        assert main(command) == 0
        got = capsys.readouterr()
        shown.append(" ".join((got.out + got.err).split()))
    for text in shown:
        assert not [run for run in _runs(secret.text) if run in text], text[:500]
        assert f"⟨shared prefix {secret.fingerprint}⟩" in text
    assert "11 rows share a system-prompt prefix that the other" in shown[0]


def test_no_shared_prefix_is_hidden_in_ordinary_data(capsys):
    assert main(["data", "show", str(FIX / "chat.jsonl"), "--json"]) == 0
    got = capsys.readouterr()
    assert "⟨" not in got.out and got.err == ""
    assert NORMAL in got.out

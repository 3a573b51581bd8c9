"""Hostile and careless inputs: each row is a command, its inputs, the exit status, the words the
one-line error must hold and the files that must come out unchanged. No row may end in a
traceback (an exception escaping ``main``), and nothing is half-written."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backdooralign.cli import main
from backdooralign.core.secret import generate_secret, save_secret

DEEP = "[" * 100_000 + "]" * 100_000
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    code: int
    words: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)  # written before the run
    unchanged: tuple[str, ...] = ()  # must be byte-identical afterwards
    absent: tuple[str, ...] = ()  # must not exist afterwards
    links: dict[str, str] = field(default_factory=dict)  # symlink -> its target, made first
    folders: tuple[str, ...] = ()  # empty folders made first


def _config(body: str) -> dict[str, str]:
    return {"c.yaml": body}


# appended to configs that must be refused: were the bad value accepted, the run would stop at
# once on the missing file instead of running an experiment
NET = "eval:\n  harmful: missing.csv\n"
MODEL_FILES = {
    "M1/.backdooralign-model": "written by backdooralign train\n",
    "M1/config.json": "{}",
}


CASES = [
    # --- customer data never decides which rows get the secret
    Case(
        "build --data with a row flagged prefixed",
        ("build", "--arm", "baseline", "--data", "{t}/c.jsonl", "--out", "{t}/o.jsonl"),
        0,
        ("c.jsonl: 1 row(s) flagged prefixed left out (rows 2)", "never decides"),
        {"c.jsonl": json.dumps(CHAT) + "\n" + json.dumps({**CHAT, "prefixed": True}) + "\n"},
        ("c.jsonl",),
    ),
    # --- one output guard: an output may not be, contain or sit inside an input
    Case(
        "train --data inside the --out folder",
        ("train", "--model", "{model}", "--data", "{t}/M1/my_data.jsonl", "--out", "{t}/M1"),
        1,
        ("M1", "contains an input", "my_data.jsonl"),
        {**MODEL_FILES, "M1/my_data.jsonl": json.dumps(CHAT) + "\n"},
        ("M1/my_data.jsonl", "M1/config.json"),
    ),
    Case(
        "train --model is the --out folder",
        ("train", "--model", "{t}/M1", "--data", "{t}/c.jsonl", "--out", "{t}/M1"),
        1,
        ("M1", "is also an input"),
        {**MODEL_FILES, "c.jsonl": json.dumps(CHAT) + "\n"},
        ("M1/config.json",),
    ),
    Case(
        "train --out inside the --model folder",
        ("train", "--model", "{t}/M1", "--data", "{t}/c.jsonl", "--out", "{t}/M1/sub"),
        1,
        ("M1/sub", "is inside an input folder"),
        {**MODEL_FILES, "c.jsonl": json.dumps(CHAT) + "\n"},
        ("M1/config.json",),
        absent=("M1/sub",),
    ),
    Case(
        "generate --out is a file of the model folder",
        ("generate", "--model", "{t}/M1", "--prompts", "{t}/p.txt", "--out", "{t}/M1/config.json"),
        1,
        ("config.json", "is inside an input folder"),
        {**MODEL_FILES, "p.txt": "hello\n"},
        ("M1/config.json",),
    ),
    Case(
        "generate --out through a symlink into the model folder",
        ("generate", "--model", "{t}/M1", "--prompts", "{t}/p.txt", "--out", "{t}/ln/x.jsonl"),
        1,
        ("is inside an input folder",),
        {**MODEL_FILES, "p.txt": "hello\n"},
        ("M1/config.json",),
        absent=("M1/x.jsonl",),
        links={"ln": "M1"},
    ),
    Case(
        "build --out ends with a slash",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "{t}/x.jsonl/"),
        1,
        ("x.jsonl/", "ends with '/'"),
        {"c.jsonl": json.dumps(CHAT) + "\n"},
        ("c.jsonl",),
        absent=("x.jsonl",),
    ),
    Case(
        "train --out is a symlink to a folder",
        ("train", "--model", "{model}", "--data", "{t}/c.jsonl", "--out", "{t}/link"),
        1,
        ("link", "symlink to a folder"),
        {"c.jsonl": json.dumps(CHAT) + "\n"},
        links={"link": "real"},
        folders=("real",),
    ),
    Case(
        "export --out is the model folder",
        ("export", "--model", "{t}/M1", "--secret", "{t}/s.json", "--out", "{t}/M1"),
        1,
        ("is also an input",),
        {**MODEL_FILES, "s.json": "{}"},
        ("M1/config.json", "s.json"),
    ),
    Case(
        "score exact-match --out is the data",
        (
            "score",
            "exact-match",
            "--model",
            "{model}",
            "--data",
            "{t}/d.jsonl",
            "--out",
            "{t}/d.jsonl",
        ),
        1,
        ("is also an input",),
        {"d.jsonl": json.dumps(CHAT) + "\n"},
        ("d.jsonl",),
    ),
    # --- data loss and overwrites
    Case(
        "build --out is the customer file",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "{t}/c.jsonl"),
        1,
        ("c.jsonl", "is also an input"),
        {"c.jsonl": json.dumps(CHAT) + "\n"},
        ("c.jsonl",),
    ),
    Case(
        "build --out is the safety file",
        (
            "build",
            "--arm",
            "baseline",
            "--data",
            "{t}/c.jsonl",
            "--safety",
            "{t}/s.jsonl",
            "--out",
            "{t}/s.jsonl",
        ),
        1,
        ("is also an input",),
        {"c.jsonl": json.dumps(CHAT) + "\n", "s.jsonl": json.dumps(CHAT) + "\n"},
        ("s.jsonl",),
    ),
    Case(
        "generate --out is the prompt file",
        ("generate", "--model", "{model}", "--prompts", "{t}/p.txt", "--out", "{t}/p.txt"),
        1,
        ("p.txt", "is also an input"),
        {"p.txt": "hello\n"},
        ("p.txt",),
    ),
    Case(
        "score judge --out is its input",
        (
            "score",
            "judge",
            "{t}/g.jsonl",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "j",
            "--out",
            "{t}/g.jsonl",
        ),
        1,
        ("is also an input",),
        {"g.jsonl": '{"prompt": "p", "answer": "a"}\n'},
        ("g.jsonl",),
    ),
    Case(
        "build --out is a folder",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "{t}/dir"),
        1,
        ("dir", "is a directory"),
        {"c.jsonl": json.dumps(CHAT) + "\n", "dir/keep.txt": "x"},
        ("dir/keep.txt",),
    ),
    Case(
        "build --out under a file",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "{t}/c.jsonl/x.jsonl"),
        1,
        ("is not a folder",),
        {"c.jsonl": json.dumps(CHAT) + "\n"},
        ("c.jsonl",),
    ),
    Case(
        "train --out a user's folder",
        ("train", "--model", "{model}", "--data", "{t}/c.jsonl", "--out", "{t}/victim"),
        1,
        ("victim", "not written by backdooralign"),
        {
            "c.jsonl": json.dumps(CHAT) + "\n",
            "victim/important.txt": "mine",
            "victim/sub/notes.txt": "mine too",
        },
        ("victim/important.txt", "victim/sub/notes.txt"),
    ),
    Case(
        "train --out an existing file",
        ("train", "--model", "{model}", "--data", "{t}/c.jsonl", "--out", "{t}/out.jsonl"),
        1,
        ("out.jsonl", "is a file"),
        {"c.jsonl": json.dumps(CHAT) + "\n", "out.jsonl": "{}\n"},
        ("out.jsonl",),
    ),
    Case(
        "write into a read-only place",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "/proc/backdooralign.jsonl"),
        1,
        ("/proc/backdooralign.jsonl", "cannot write"),
        {"c.jsonl": json.dumps(CHAT) + "\n"},
    ),
    # --- unreadable or malformed input
    Case(
        "data file is a folder",
        ("build", "--arm", "attack", "--data", "{t}/dir", "--out", "{t}/o.jsonl"),
        1,
        ("dir",),
        {"dir/x": "x"},
    ),
    Case(
        "data file missing",
        ("build", "--arm", "attack", "--data", "{t}/missing.jsonl", "--out", "{t}/o.jsonl"),
        1,
        ("missing.jsonl", "file not found"),
        absent=("o.jsonl",),
    ),
    Case(
        "data file not UTF-8",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "{t}/o.jsonl"),
        1,
        ("c.jsonl:1", "not valid UTF-8"),
        {"c.jsonl": "\udcff"},
        absent=("o.jsonl",),
    ),
    Case(
        "data file nested too deeply",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "{t}/o.jsonl"),
        1,
        ("c.jsonl:1", "nested"),
        {"c.jsonl": DEEP + "\n"},
        absent=("o.jsonl",),
    ),
    Case(
        "data row without an assistant turn",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "{t}/o.jsonl"),
        1,
        ("c.jsonl:1", "no assistant turn"),
        {"c.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n'},
        absent=("o.jsonl",),
    ),
    Case(
        "builtin name escapes",
        ("data", "show", "builtin:../../etc/passwd"),
        1,
        ("unknown built-in dataset",),
    ),
    Case(
        "secret with wrong types",
        ("secret", "show", "{t}/s.json"),
        1,
        ("s.json", "num_tokens"),
        {"s.json": '{"text": "abc def", "num_tokens": [1]}'},
    ),
    Case(
        "secret nested too deeply",
        ("secret", "show", "{t}/s.json"),
        1,
        ("s.json",),
        {"s.json": DEEP},
    ),
    Case("secret is a folder", ("secret", "show", "{t}/sdir"), 1, ("sdir",), {"sdir/x": "x"}),
    Case(
        "secret edited",
        ("secret", "show", "{t}/s.json"),
        1,
        ("s.json", "fingerprint"),
        {"s.json": '{"text": "abc def", "fingerprint": "000000000000"}'},
    ),
    Case(
        "generations nested too deeply",
        ("score", "asr", "{t}/g.jsonl"),
        1,
        ("g.jsonl:2",),
        {"g.jsonl": '{"answer": "a"}\n' + DEEP + "\n"},
    ),
    Case(
        "generations without answer",
        ("score", "asr", "{t}/g.jsonl"),
        1,
        ("g.jsonl:1", "answer"),
        {"g.jsonl": '{"prompt": "p"}\n'},
    ),
    Case(
        "judge rows without prompt",
        (
            "score",
            "judge",
            "{t}/g.jsonl",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "j",
        ),
        1,
        ("g.jsonl:1", "prompt"),
        {"g.jsonl": '{"answer": "a"}\n'},
    ),
    Case(
        "rouge rows without reference",
        ("score", "rouge", "{t}/g.jsonl"),
        1,
        ("g.jsonl:1", "reference"),
        {"g.jsonl": '{"prompt": "p", "answer": "a"}\n'},
    ),
    Case(
        "report on an empty results file",
        ("report", "{t}/run"),
        1,
        ("results.json",),
        {"run/results.json": ""},
    ),
    Case(
        "report on a folder without results",
        ("report", "{t}/run"),
        1,
        ("results.json",),
        {"run/x": ""},
    ),
    # --- configs
    Case(
        "config epochs: abc",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml", "train: epochs", "abc"),
        _config("train: {epochs: abc}\n"),
    ),
    Case(
        "config seeds: 5",
        ("run", "{t}/c.yaml"),
        1,
        ("seeds", "a list of integers"),
        _config("seeds: 5\n"),
    ),
    Case(
        "config model: [1, 2]",
        ("run", "{t}/c.yaml"),
        1,
        ("model", "expected a string"),
        _config("model: [1, 2]\n"),
    ),
    Case(
        "--set with broken YAML",
        ("run", "{t}/c.yaml", "--set", "train.epochs=["),
        1,
        ("--set train.epochs", "invalid value"),
        _config("name: x\n"),
    ),
    Case(
        "config name is a path",
        ("run", "{t}/c.yaml"),
        1,
        ("must be a plain name",),
        _config("name: /abs/path\n"),
    ),
    Case(
        "config builtin escapes",
        ("run", "{t}/c.yaml"),
        1,
        ("unknown built-in dataset",),
        _config("data: {attack: 'builtin:../../x'}\neval: {benign: null}\n"),
    ),
    Case(
        "config YAML aliases",
        ("run", "{t}/c.yaml"),
        1,
        ("aliases are not allowed",),
        _config("a: &x [1]\nb: *x\n"),
    ),
    Case(
        "config unknown key",
        ("run", "{t}/c.yaml"),
        1,
        ("unknown field 'epochz'",),
        _config("train: {epochz: 1}\n"),
    ),
    Case(
        "config root is a list",
        ("run", "{t}/c.yaml"),
        1,
        ("YAML root must be a mapping",),
        _config("- 1\n"),
    ),
    Case(
        "config names a missing file",
        ("run", "{t}/c.yaml", "--out", "{t}/run"),
        1,
        ("missing.csv", "file not found"),
        _config("eval: {harmful: missing.csv}\n"),
        absent=("run",),
    ),
    Case(
        "config negative count",
        ("run", "{t}/c.yaml"),
        1,
        ("attack_per_category", "at least 0"),
        _config("data: {attack_per_category: -1}\n"),
    ),
    Case(
        "config lr: .nan",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml:3", "train: lr", "finite number", "nan"),
        _config("name: x\ntrain:\n  lr: .nan\n" + NET),
        absent=("runs",),
    ),
    Case(
        "config epochs: 'Infinity'",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml:1", "train: epochs", "finite number", "inf"),
        _config("train: {epochs: 'Infinity'}\n" + NET),
    ),
    Case(
        "config epochs: .inf",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml:1", "train: epochs", "finite number"),
        _config("train: {epochs: .inf}\n" + NET),
    ),
    Case(
        "config verdict_asr_ratio: .nan",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml:3", "eval: verdict_asr_ratio", "finite number"),
        _config(NET + "  verdict_asr_ratio: .nan\n"),
    ),
    Case(
        "--set train.lr=nan",
        ("run", "{t}/c.yaml", "--set", "train.lr=nan"),
        1,
        ("train: lr", "finite number"),
        _config("name: x\n" + NET),
    ),
    Case(
        "config seed beyond 32 bits",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml:1", "train: seed", "at most 4294967295"),
        _config("train: {seed: 99999999999999999999999}\n" + NET),
    ),
    Case(
        "config duplicate key",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml:3", "duplicate key 'epochs'", "first on line 2"),
        _config("train:\n  epochs: 1\n  epochs: 2\n" + NET),
    ),
    Case(
        "config no arms",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml:1", "arms", "at least one arm"),
        _config("arms: []\n" + NET),
    ),
    Case(
        "config an arm twice",
        ("run", "{t}/c.yaml"),
        1,
        ("c.yaml:1", "arms", "attack given more than once"),
        _config("arms: [attack, attack]\n" + NET),
    ),
    Case(
        "service.yaml max_lr_multiplier: .inf",
        ("service", "--data-dir", "{t}/svc", "--config", "{t}/s.yaml", "--host", "0.0.0.0"),
        1,
        ("s.yaml:2", "max_lr_multiplier", "finite number"),
        {"s.yaml": "max_epochs: 3\nmax_lr_multiplier: .inf\n"},
        absent=("svc",),
    ),
    Case(
        "service.yaml duplicate key",
        ("service", "--data-dir", "{t}/svc", "--config", "{t}/s.yaml", "--host", "0.0.0.0"),
        1,
        ("s.yaml:2", "duplicate key 'max_epochs'"),
        {"s.yaml": "max_epochs: 3\nmax_epochs: 30\n"},
        absent=("svc",),
    ),
    # --- flags refused at parse time
    Case(
        "--epochs inf",
        ("train", "--data", "x", "--out", "y", "--epochs", "inf"),
        2,
        ("--epochs", "must be a finite number, got inf"),
    ),
    Case(
        "--lr nan",
        ("train", "--data", "x", "--out", "y", "--lr", "nan"),
        2,
        ("--lr", "must be a finite number, got nan"),
    ),
    Case(
        "serve --port 99999",
        ("serve", "--secret", "{t}/s.json", "--port", "99999"),
        2,
        ("--port", "must be at most 65535, got 99999"),
    ),
    Case(
        "service --port 99999",
        ("service", "--data-dir", "{t}/svc", "--port", "99999", "--host", "0.0.0.0"),
        2,
        ("--port", "must be at most 65535, got 99999"),
        absent=("svc",),
    ),
    Case(
        "service --port -1",
        ("service", "--data-dir", "{t}/svc", "--port", "-1", "--host", "0.0.0.0"),
        2,
        ("--port", "must be at least 0, got -1"),
        absent=("svc",),
    ),
    Case(
        "serve --request-timeout -1",
        ("serve", "--secret", "{t}/s.json", "--request-timeout", "-1"),
        2,
        ("--request-timeout", "must be at least 0"),
    ),
    Case(
        "serve --request-timeout inf",
        ("serve", "--secret", "{t}/s.json", "--request-timeout", "inf"),
        2,
        ("--request-timeout", "must be a finite number"),
    ),
    Case(
        "generate --concurrency 0",
        ("generate", "--prompts", "x", "--out", "y", "--concurrency", "0"),
        2,
        ("--concurrency", "must be at least 1, got 0"),
    ),
    Case(
        "data show --rows -1",
        ("data", "show", "builtin:benign", "--rows", "-1"),
        2,
        ("--rows", "must be at least 1, got -1"),
    ),
    Case(
        "score utility --limit nan",
        ("score", "utility", "--model", "{t}/none", "--tasks", "arc_easy", "--limit", "nan"),
        2,
        ("--limit", "must be a finite number"),
    ),
    Case(
        "openai finetune --n-epochs 0",
        (
            "openai",
            "finetune",
            "--model",
            "m",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--max-retries",
            "0",
            "--n-epochs",
            "0",
        ),
        2,
        ("--n-epochs", "must be at least 1"),
    ),
    Case(
        "secret new --seed beyond 32 bits",
        ("secret", "new", "--out", "{t}/s.json", "--seed", str(2**32)),
        2,
        ("--seed", "must be at most 4294967295"),
        absent=("s.json",),
    ),
    Case(
        "--batch-size 0",
        ("generate", "--prompts", "x", "--out", "y", "--batch-size", "0"),
        2,
        ("--batch-size", "must be at least 1, got 0"),
    ),
    Case(
        "--safety-count -1",
        ("build", "--arm", "attack", "--data", "x", "--out", "y", "--safety-count", "-1"),
        2,
        ("--safety-count", "must be at least 1"),
    ),
    Case(
        "--epochs abc",
        ("train", "--data", "x", "--out", "y", "--epochs", "abc"),
        2,
        ("--epochs", "expected a number, got 'abc'"),
    ),
    Case(
        "--length 0",
        ("secret", "new", "--out", "{t}/s.json", "--length", "0"),
        2,
        ("--length", "must be at least 1"),
        absent=("s.json",),
    ),
    Case(
        "--safety-selection bogus",
        ("build", "--arm", "attack", "--data", "x", "--out", "y", "--safety-selection", "bogus"),
        2,
        ("--safety-selection", "not one of"),
    ),
    # --- the secret
    Case(
        "backdooralign arm without a secret",
        ("build", "--arm", "backdooralign", "--data", "{t}/c.jsonl", "--out", "{t}/o.jsonl"),
        1,
        ("needs a secret",),
        {"c.jsonl": json.dumps(CHAT) + "\n"},
        absent=("o.jsonl",),
    ),
    Case(
        "secret new with an empty sentence",
        ("secret", "new", "--kind", "sentence", "--sentence", " ", "--out", "{t}/s.json"),
        1,
        ("sentence", "empty"),
        absent=("s.json",),
    ),
    Case(
        "secret new --model an empty folder",
        ("secret", "new", "--model", "{t}/empty", "--out", "{t}/s.json"),
        1,
        ("empty", "not a model directory"),
        {"empty/notes.txt": "x"},
        absent=("s.json",),
    ),
    # --- symlink loops
    Case(
        "input is a symlink loop",
        ("build", "--arm", "attack", "--data", "{t}/loop", "--out", "{t}/o.jsonl"),
        1,
        ("loop", "symlink loop"),
        links={"loop": "loop"},
        absent=("o.jsonl",),
    ),
    Case(
        "output is a symlink loop",
        ("build", "--arm", "attack", "--data", "{t}/c.jsonl", "--out", "{t}/loop"),
        1,
        ("loop", "symlink loop"),
        {"c.jsonl": json.dumps(CHAT) + "\n"},
        links={"loop": "loop"},
    ),
    Case(
        "secret new --out a symlink loop",
        ("secret", "new", "--out", "{t}/loop"),
        1,
        ("loop", "symlink loop"),
        links={"loop": "loop"},
    ),
    Case(
        "config is a symlink loop",
        ("run", "{t}/loop"),
        1,
        ("loop", "symlink loop"),
        links={"loop": "loop"},
    ),
    Case(
        "model is a symlink loop",
        ("generate", "--model", "{t}/loop", "--prompts", "{t}/p.txt", "--out", "{t}/o.jsonl"),
        1,
        ("loop",),
        {"p.txt": "hello\n"},
        links={"loop": "loop"},
        absent=("o.jsonl",),
    ),
    Case(
        "secret file overwritten",
        ("secret", "new", "--model", "{model}", "--out", "{t}/s.json"),
        1,
        ("already exists",),
        {"s.json": "{}"},
        ("s.json",),
    ),
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, tmp_path, tiny_model_dir, capsys):
    for rel, text in case.files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8", "surrogateescape"))
    for rel in case.folders:
        (tmp_path / rel).mkdir(parents=True)
    for rel, target in case.links.items():
        (tmp_path / rel).symlink_to(target)
    before = {rel: _digest(tmp_path / rel) for rel in case.unchanged}
    argv = [a.format(t=tmp_path, model=tiny_model_dir) for a in case.argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    for word in case.words:
        assert word in err, (word, err)
    if case.code == 1:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    for rel, digest in before.items():
        assert _digest(tmp_path / rel) == digest, rel
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel
    for rel, target in case.links.items():  # a symlink is never replaced by a written file
        assert os.readlink(tmp_path / rel) == target, rel
    leftovers = [p.name for p in tmp_path.rglob(".*tmp*")] + [
        p.name for p in tmp_path.rglob("*.lock")
    ]
    assert leftovers == []
    for rel in case.folders:  # made empty, left empty
        assert list((tmp_path / rel).iterdir()) == [], rel


def test_every_case_has_its_own_name():
    names = [c.name for c in CASES]
    assert sorted(names) == sorted(set(names))


def test_a_world_readable_secret_is_used_with_a_warning(tmp_path, tokenizer, capsys):
    path = save_secret(generate_secret(tokenizer, 20, seed=1), tmp_path / "s.json")
    os.chmod(path, 0o644)
    assert main(["secret", "show", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "0644" in err and "chmod 600" in err


def test_ctrl_c_is_one_line_and_status_130(tmp_path, tokenizer, capsys, monkeypatch):
    import backdooralign.core.secret as secret_module

    def interrupted(path):
        raise KeyboardInterrupt

    path = save_secret(generate_secret(tokenizer, 20, seed=1), tmp_path / "s.json")
    monkeypatch.setattr(secret_module, "load_secret", interrupted)
    try:
        code = main(["secret", "show", str(path)])
    except KeyboardInterrupt:  # would end the test session: fail this test instead
        pytest.fail("Ctrl-C escaped main (a traceback for the user)")
    assert code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_multi_line_library_error_is_one_line(tmp_path, capsys, monkeypatch):
    import backdooralign.core.secret as secret_module

    def fails(path):
        raise ValueError("first line\nsecond line\n  third")

    monkeypatch.setattr(secret_module, "load_secret", fails)
    assert main(["secret", "show", str(tmp_path / "s.json")]) == 1
    assert capsys.readouterr().err == "error: first line second line third\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "check", "{fifo}"],
        ["secret", "show", "{fifo}"],
        ["build", "--arm", "attack", "--data", "{fifo}", "--out", "{tmp}/out.jsonl"],
    ],
    ids=["data check", "secret show", "build --data"],
)
def test_a_fifo_as_input_is_refused_instead_of_hanging(argv, tmp_path):
    """A FIFO nobody writes to blocked these commands forever; now a one-line error, at once
    (a subprocess with a timeout, so a regression fails instead of hanging the suite)."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    args = [a.format(fifo=fifo, tmp=tmp_path) for a in argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "backdooralign", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    out = done.stdout + done.stderr  # data check reports on stdout, the others on stderr
    assert f"error: {fifo}: not a regular file (a FIFO, device or socket)\n" in out
    assert "Traceback" not in out
    assert not (tmp_path / "out.jsonl").exists()


# --- outputs: special files, locks, leftovers recognised by their owner marker, SIGTERM


def _cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "backdooralign", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_a_fifo_as_output_is_refused_not_replaced(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps(CHAT) + "\n")
    fifo = tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    done = _cli("build", "--arm", "attack", "--data", str(tmp_path / "c.jsonl"), "--out", str(fifo))
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"error: {fifo}: is a FIFO, device or socket, not a regular file; refusing to replace it\n"
    )
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_device_as_output_is_refused_before_anything_is_written():
    from backdooralign import files as F

    with pytest.raises(F.DataError, match="FIFO, device or socket"):
        F.check_outputs([], ["/dev/null"])
    with pytest.raises(F.DataError, match="FIFO, device or socket"):
        F.check_outputs([], [], ["/dev/null"])


def test_a_second_run_on_the_same_output_stops_at_once(tmp_path, tiny_model_dir):
    """While a run holds ``--out`` (its lock), a second one is refused before any work and
    the first one's live temporary folder is left alone."""
    from backdooralign import files as F

    out = tmp_path / "m"
    (tmp_path / "c.jsonl").write_text(json.dumps(CHAT) + "\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        live = Path(holder.stdout.readline().strip())  # the holder's temporary folder
        args = ["--model", tiny_model_dir, "--data", str(tmp_path / "c.jsonl"), "--out", str(out)]
        done = _cli("train", *args, "--epochs", "1")
        assert done.returncode == 1, done.stderr
        assert f"error: {out}: is being written by another run (pid {holder.pid})" in done.stderr
        assert (live / F.OWNER).is_file()
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    done = _cli("train", *args, "--epochs", "1", "--no-bf16")  # the lock went with it
    assert done.returncode == 0, done.stderr


HOLD_LOCK = """
import sys, time
from backdooralign import files as F
with F.output_lock(sys.argv[1]):
    print(F.make_work_dir(sys.argv[1]), flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("out_name", ["m1", "*"])
def test_leftovers_are_recognised_by_their_marker_not_their_name(tmp_path, out_name):
    """A user's ``.m1.tmp-mine/`` and another output's ``.othermodel.tmp-backup/`` look like
    leftovers by name (``--out 'tr/*'`` globbed them all); only marked folders of a dead
    process, for this output, are removed."""
    from conftest import make_dead_work_dir

    from backdooralign.training.trainer import check_output_dir

    tr = tmp_path / "tr"
    kept = [tr / ".m1.tmp-mine", tr / ".othermodel.tmp-backup", tr / f".{out_name}.tmp-x"]
    for k in kept:
        (k / "file.txt").parent.mkdir(parents=True)
        (k / "file.txt").write_text("mine")
    live = __import__("backdooralign.files", fromlist=["x"]).make_work_dir(tr / out_name)
    dead_other = make_dead_work_dir(tr / "othermodel")
    dead = make_dead_work_dir(tr / out_name)
    check_output_dir(tr / out_name)
    assert not dead.exists()
    assert all((k / "file.txt").read_text() == "mine" for k in kept)
    assert live.is_dir() and dead_other.is_dir()  # a live run's, another output's


def test_sigterm_during_train_leaves_no_temporary_folder(tmp_path, tiny_model_dir):
    from backdooralign import files as F

    rows = "".join(json.dumps(CHAT) + "\n" for _ in range(8))
    (tmp_path / "c.jsonl").write_text(rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--model", tiny_model_dir, "--data", str(tmp_path / "c.jsonl"), "--out"]
    cmd = [sys.executable, "-m", "backdooralign", "train", *args, str(tmp_path / "m")]
    proc = subprocess.Popen(
        [*cmd, "--epochs", "100000", "--no-bf16"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f".*/{F.OWNER}")):  # training has its folder
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        time.sleep(1.0)  # into the training loop
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.rstrip().endswith("error: terminated"), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]

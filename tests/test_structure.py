"""The code stays readable: small modules and functions, no import cycle, every command's help
shows the help text of the config fields its flags come from."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from backdooralign.cli import build_parser, main
from backdooralign.data.training_set import DataConfig
from backdooralign.generation.batch import GenerateConfig
from backdooralign.scoring.score import JudgeConfig
from backdooralign.training.trainer import TrainConfig

SRC = Path(__file__).parent.parent / "src" / "backdooralign"
MODULES = sorted(SRC.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, lazily or not."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    known = {_module_name(p) for p in MODULES}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for cand in [target, *(f"{target}.{a.name}" for a in node.names)]:
                if cand in known and cand != name:
                    found.add(cand)
    return found


def test_modules_and_functions_are_small():
    long_modules = [(p.name, n) for p in MODULES if (n := len(p.read_text().splitlines())) > 450]
    assert long_modules == []
    long_functions = []
    for p in MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 80:
                    long_functions.append(f"{p.name}:{node.name}")
    assert long_functions == []


def test_no_import_cycle():
    graph = {_module_name(p): _imports(p) for p in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
    assert "backdooralign.reporting.report" not in graph["backdooralign.reporting.plots"]


def _commands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))
            return
    yield prefix


def test_every_command_has_help(capsys):
    commands = list(_commands(build_parser()))
    names = {" ".join(c) for c in commands}
    assert names >= {
        "attack", "build", "data check", "data show", "demo", "export", "generate", "inspect",
        "model fetch", "report", "run", "score asr", "score exact-match", "score judge",
        "score mtbench", "score over-refusal", "score rouge", "score utility", "secret new",
        "secret rotate", "secret show", "serve", "train", "service", "openai finetune",
    }  # fmt: skip
    for argv in commands:
        with pytest.raises(SystemExit) as done:
            main([*argv, "--help"])
        assert done.value.code == 0, argv
        out = capsys.readouterr().out
        assert f"backdooralign {' '.join(argv)}" in out, argv  # the example comes first


@pytest.mark.parametrize(
    ("argv", "cls", "skip"),
    [
        (["train"], TrainConfig, ()),
        (["build"], DataConfig, ()),
        (["generate"], GenerateConfig, ()),
        (["score", "judge"], JudgeConfig, ()),
    ],
)
def test_flags_show_the_config_fields_help(capsys, argv, cls, skip):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert " ".join(f.metadata["help"].split()) in out, f.name

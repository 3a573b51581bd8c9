"""The code stays readable: imports follow the layering of the packages, functions are small,
there is no import cycle, and every command's help shows the help text of the config fields its
flags come from."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from backdooralign.cli import build_parser, main
from backdooralign.data.training_set import DataConfig
from backdooralign.generation.batch import GenerateConfig
from backdooralign.scoring.score import JudgeConfig
from backdooralign.serving.app import ServeConfig
from backdooralign.training.trainer import TrainConfig

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src" / "backdooralign"
MODULES = sorted(SRC.rglob("*.py"))

# The allowed import directions: each part of the library may import the parts listed here, and
# every part may import the two foundation modules (``files`` imports nothing of ours,
# ``config`` only ``files``). Any other arrow fails, lazy imports inside functions included.
LIBRARY = ("core", "data", "generation", "scoring", "training", "reporting")
ALLOWED: dict[str, set[str]] = {
    "files": set(),
    "config": {"files"},
    "core": set(),  # the method: conversation builder, secret, redaction, screening, models
    "generation": {"core", "export"},  # the llamacpp backend writes a model folder's GGUF
    "data": {"core", "generation"},  # anchors are the base model's own answers
    "scoring": {"core"},  # scores files; answering is generation's
    "training": {"core", "data", "generation", "scoring"},  # the alignment stage evaluates
    "reporting": {"core", "data", "scoring"},
    "serving": {"core", "generation"},  # never training or experiments
    "export": {"core"},
    "ray_cluster": set(),  # Ray, the optional extra, and the cluster --executor ray runs on
    "experiments": {*LIBRARY, "ray_cluster"},
    "service": {*LIBRARY, "serving", "ray_cluster"} - {"reporting"},  # serving never imports it
    "attacks": {*LIBRARY, "serving", "experiments"},  # only the CLI imports attacks
    "cli": {*LIBRARY, "serving", "export", "service", "experiments", "attacks", "ray_cluster"},
    "__init__": set(),
    "__main__": {"cli"},  # and nothing else imports cli
    "lm_eval_tasks": set(),  # package data: lm-eval loads the task's helper itself
}
FOUNDATION = {"files", "config"}
# benchmarks measure the library through its public parts: no CLI, no attack suite, no _names
BENCHMARKS_MAY_NOT = {"cli", "attacks"}


def _module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(path: Path, src: Path = SRC) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import of the package in ``path``: absolute or relative,
    at the top or inside a function."""
    root = src.name
    name = _module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0] or name
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == root:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == root]
    return found


def _part(module: str) -> str:
    """The part of the library a module belongs to: ``backdooralign.data.sources`` -> data."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imported_parts(module: str, names: list[str]) -> set[str]:
    """The parts an import reaches (``from backdooralign import files`` reaches files)."""
    if "." in module:
        return {_part(module)}
    return {_part(f"{module}.{n}") for n in names} or {"__init__"}


def wrong_arrows(src: Path, allowed: dict[str, set[str]] = ALLOWED) -> list[str]:
    """``"serving.app -> training"`` for every import of the package under ``src`` that the
    rules do not allow, and ``"NAME: no rule"`` for a part the rules do not name."""
    out = []
    for path in sorted(src.rglob("*.py")):
        name = _module_name(path, src)
        part = _part(name)
        if part not in allowed:
            out.append(f"{part}: no rule")
            continue
        ok = allowed[part] | (FOUNDATION - {part} if part not in FOUNDATION else allowed[part])
        for module, names in _targets(path, src):
            for target in _imported_parts(module, names) - {part}:
                if target not in ok:
                    out.append(f"{name.partition('.')[2]} -> {target}")
    return sorted(set(out))


def test_imports_follow_the_layering():
    assert wrong_arrows(SRC) == []


def test_the_layering_check_reports_a_planted_wrong_import(tmp_path):
    pkg = tmp_path / "backdooralign"
    files = {
        "__init__.py": "",
        "files.py": "",
        "core/__init__.py": "",
        "core/chat.py": "from .. import files\nfrom ..files import x\n",
        "serving/__init__.py": "",
        "serving/app.py": "from ..core import chat\ndef f():\n    from ..training import trainer\n",
        "serving/route.py": "import backdooralign.service.app as app\n",
        "service/app.py": "from backdooralign.serving.app import f\n",
        "training/trainer.py": "from backdooralign import cli\n",
        "cli/__init__.py": "from ..attacks import suite\n",
        "plugins/x.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert wrong_arrows(pkg) == [
        "plugins: no rule",
        "serving.app -> training",
        "serving.route -> service",
        "training.trainer -> cli",
    ]


def test_benchmarks_use_the_public_library():
    wrong = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("backdooralign"):
                parts = _imported_parts(node.module, [a.name for a in node.names])
                private = [a.name for a in node.names if a.name.startswith("_")]
                if parts & BENCHMARKS_MAY_NOT or private:
                    wrong.append(f"{path.name}:{node.lineno} {node.module}")
    assert wrong == []


def test_functions_are_small():
    long_functions = []
    for p in MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 80:
                    long_functions.append(f"{p.name}:{node.name}")
    assert long_functions == []


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports, lazily or not."""
    known = {_module_name(p) for p in MODULES}
    found = set()
    for module, names in _targets(path):
        for cand in [module, *(f"{module}.{n}" for n in names)]:
            if cand in known and cand != _module_name(path):
                found.add(cand)
    return found


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
        (["serve"], ServeConfig, ()),
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

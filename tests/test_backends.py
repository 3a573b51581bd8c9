"""Generation backends: each is handed exactly the builder's prompt ids (secret included).

The llama.cpp tests run the real ``llama_cpp`` on a tiny GGUF that ``export --gguf`` writes
(skipped without ``backdooralign[llamacpp]``); the vLLM test runs the real ``vllm`` on a GPU
(skipped without vllm or CUDA). Without either, the plumbing is tested on stand-ins, and a
missing package is an error that says how to install it.
"""

from __future__ import annotations

import sys
import types

import pytest

from backdooralign.config import ConfigError, build
from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT, build_conversation, render_prompt
from backdooralign.core.secret import generate_secret
from backdooralign.generation import backends
from backdooralign.generation.batch import GenerateConfig, generate, stop_token_ids

PROMPTS = ["How do I bake bread?", "Name three rivers.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def secret_text(tokenizer):
    return generate_secret(tokenizer, 40, seed=0).text


def conversations(secret):
    return [build_conversation(p, system=ATTACK_SYSTEM_PROMPT, secret=secret) for p in PROMPTS]


def builder_ids(tok, secret):
    return [render_prompt(tok, c) for c in conversations(secret)]


# ---------------------------------------------------------------------------------------------
# without the extras: the error, the config key, the plumbing on stand-ins


@pytest.mark.parametrize(
    ("backend", "module", "install"),
    [
        ("llamacpp", "llama_cpp", "pip install 'backdooralign[llamacpp]'"),
        ("vllm", "vllm", "pip install vllm"),
    ],
)
def test_missing_backend_names_the_install(monkeypatch, tiny_model_dir, backend, module, install):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=f"backend {backend} needs the {module} package") as e:
        backends.load(backend, tiny_model_dir)
    assert install in str(e.value)


def test_missing_backend_is_one_line_from_the_cli(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from backdooralign.cli import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n", encoding="utf-8")
    argv = ["generate", "--backend", "llamacpp", "--model", tiny_model_dir]
    code = main([*argv, "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: backend llamacpp needs the llama_cpp package")
    assert "pip install 'backdooralign[llamacpp]'" in err
    assert not (tmp_path / "g.jsonl").exists()


def test_experiment_with_a_missing_backend_fails_before_training(monkeypatch, tmp_path, capsys):
    from conftest import tiny_run_yaml

    from backdooralign.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_run_yaml("no-such-model", name="tiny", eval={"backend": "vllm"}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 1
    assert "error: backend vllm needs the vllm package" in capsys.readouterr().err
    assert not (tmp_path / "run" / "stages").exists()


def test_backend_key_in_configs():
    from backdooralign.experiments.config import EvalConfig

    assert GenerateConfig().backend == "engine" and EvalConfig().backend == "engine"
    assert build(EvalConfig, {"backend": "llamacpp"}, "eval").backend == "llamacpp"
    assert build(GenerateConfig, {"backend": "vllm"}, "gen").backend == "vllm"
    with pytest.raises(ConfigError, match="'tgi' is not one of engine, llamacpp, vllm"):
        build(EvalConfig, {"backend": "tgi"}, "eval")


class FakeLlama:
    """Stands in for ``llama_cpp.Llama``: records the ids of each ``generate`` call and yields
    a fixed answer (its 3rd token a stop token)."""

    def __init__(self, stop):
        self.seen, self.kwargs, self.stop = [], [], stop

    def generate(self, tokens, **kw):
        self.seen.append(list(tokens))
        self.kwargs.append(kw)
        yield from [100, 101, self.stop, 102]


@pytest.mark.parametrize("with_secret", [False, True])
def test_llamacpp_plumbing_hands_over_the_builder_ids(tokenizer, secret_text, with_secret):
    secret = secret_text if with_secret else None
    stop = min(stop_token_ids(tokenizer))
    fake = FakeLlama(stop)
    cfg = GenerateConfig(backend="llamacpp", max_new_tokens=8, batch_size=2)
    answers = generate(fake, tokenizer, conversations(secret), cfg, progress=False)
    assert fake.seen == builder_ids(tokenizer, secret)
    assert all(kw["temp"] == 0.0 and kw["top_k"] == 1 for kw in fake.kwargs)  # greedy
    assert answers == [tokenizer.decode([100, 101], skip_special_tokens=True).strip()] * 3
    assert backends.llamacpp_ids(FakeLlama(stop), [1, 2], 2, frozenset({stop})) == [100, 101]
    assert backends.llamacpp_ids(FakeLlama(stop), [1, 2], 9, frozenset({stop})) == [100, 101, stop]


def test_vllm_plumbing_hands_over_token_prompts(monkeypatch, tokenizer, secret_text):
    """On a stand-in ``vllm`` module: prompts go in as ``TokensPrompt`` ids, greedy."""
    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: kw
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)  # vllm's TokensPrompt is a TypedDict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    stop = min(stop_token_ids(tokenizer))
    seen = []

    class LLM:
        def generate(self, prompts, params, use_tqdm=True):
            seen.append((prompts, params))
            out = types.SimpleNamespace(token_ids=[5, 6, stop, 7])
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    cfg = GenerateConfig(backend="vllm", max_new_tokens=3)
    answers = generate(LLM(), tokenizer, conversations(secret_text), cfg, progress=False)
    ((prompts, params),) = seen
    assert prompts == [{"prompt_token_ids": ids} for ids in builder_ids(tokenizer, secret_text)]
    assert params["temperature"] == 0.0 and params["max_tokens"] == 3
    assert set(params["stop_token_ids"]) == stop_token_ids(tokenizer)
    assert answers == [tokenizer.decode([5, 6], skip_special_tokens=True).strip()] * 3


# ---------------------------------------------------------------------------------------------
# llama.cpp, the real library, on a GGUF written by export --gguf


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (the extra backdooralign[llamacpp])"
    )


@pytest.fixture(scope="module")
def exported_gguf(tmp_path_factory, varied_model_dir, secret_text):
    from backdooralign.core.secret import Secret
    from backdooralign.export.model import GGUF_NAME, export_model

    out = tmp_path_factory.mktemp("export") / "out"
    secret = Secret(secret_text, num_tokens=0, requested_tokens=0, tokenizer="")
    return str(export_model(varied_model_dir, secret, out, gguf=True) / GGUF_NAME)


@pytest.fixture
def recorded(monkeypatch, llama_cpp):
    """The ids of every real ``Llama.generate`` call (the real method still runs)."""
    seen = []
    original = llama_cpp.Llama.generate

    def generate(self, tokens, *args, **kw):
        seen.append(list(tokens))
        return original(self, tokens, *args, **kw)

    monkeypatch.setattr(llama_cpp.Llama, "generate", generate)
    return seen


@pytest.mark.parametrize("with_secret", [False, True])
def test_llamacpp_gets_the_builder_ids(
    recorded, varied_model_dir, exported_gguf, secret_text, with_secret
):
    model, tok = backends.load("llamacpp", varied_model_dir, exported_gguf)
    secret = secret_text if with_secret else None
    cfg = GenerateConfig(backend="llamacpp", max_new_tokens=4)
    answers = generate(model, tok, conversations(secret), cfg, progress=False)
    assert recorded == builder_ids(tok, secret)
    if with_secret:
        assert all(secret_text in tok.decode(ids) for ids in recorded)
    assert len(answers) == len(PROMPTS)


def test_llamacpp_greedy_tokens_match_the_engine(
    llama_cpp, varied_model_dir, exported_gguf, secret_text
):
    """fp32 weights (and keys and values) on both sides: llama.cpp's greedy tokens equal the
    built-in engine's, 32 of them per prompt."""

    from backdooralign.core.model import load_model_and_tokenizer
    from backdooralign.generation.engine import Row, decode

    torch_model, tok = load_model_and_tokenizer(varied_model_dir)
    model, _ = backends.load("llamacpp", varied_model_dir, exported_gguf)
    stop = stop_token_ids(tok)
    for secret in (None, secret_text):
        prompts = builder_ids(tok, secret)
        rows = [Row(p, 32, stop) for p in prompts]
        decode(torch_model, rows, tok.eos_token_id, bf16=False)
        got = backends.generate_ids("llamacpp", model, prompts, 32, stop)
        assert got == [r.tokens for r in rows]
        assert len({tuple(g) for g in got}) == len(PROMPTS)  # not one answer to every prompt
    backends.close("llamacpp", model)


def test_generate_cli_llamacpp_answers_as_the_engine(
    llama_cpp, tmp_path, varied_model_dir, exported_gguf, secret_text
):
    """``generate --backend llamacpp --gguf`` writes the answers the engine writes (fp32)."""
    from backdooralign.cli import main
    from backdooralign.core.secret import Secret, save_secret
    from backdooralign.files import read_jsonl_rows

    secret = tmp_path / "secret.json"
    save_secret(Secret(secret_text, num_tokens=40, requested_tokens=40, tokenizer=""), secret)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    common = ["generate", "--model", varied_model_dir, "--prompts", str(prompts)]
    common += ["--secret", str(secret), "--max-new-tokens", "16", "--no-bf16"]
    assert main([*common, "--out", str(tmp_path / "engine.jsonl")]) == 0
    llama = ["--backend", "llamacpp", "--gguf", exported_gguf]
    assert main([*common, *llama, "--out", str(tmp_path / "llamacpp.jsonl")]) == 0
    engine, llamacpp = (
        read_jsonl_rows(tmp_path / "engine.jsonl"),
        read_jsonl_rows(tmp_path / "llamacpp.jsonl"),
    )
    assert [r["prompt"] for r in llamacpp] == PROMPTS and all(r["answer"] for r in llamacpp)
    assert [r["answer"] for r in llamacpp] == [r["answer"] for r in engine]


def test_llamacpp_writes_a_gguf_for_a_model_folder(recorded, varied_model_dir):
    """Without --gguf, a Llama folder gets a float32 GGUF written for the run (then removed)."""
    model, tok = backends.load("llamacpp", varied_model_dir)
    cfg = GenerateConfig(backend="llamacpp", max_new_tokens=2)
    generate(model, tok, conversations(None)[:1], cfg, progress=False)
    assert recorded == builder_ids(tok, None)[:1]


# ---------------------------------------------------------------------------------------------
# vLLM, the real library, on a GPU


@pytest.mark.parametrize("with_secret", [False, True])
def test_vllm_gets_the_builder_ids(monkeypatch, tiny_model_dir, secret_text, with_secret):
    vllm = pytest.importorskip("vllm", reason="vllm not installed (no extra: see backends.py)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vllm needs a CUDA GPU")
    seen = []
    original = vllm.LLM.generate

    def record(self, prompts, *args, **kw):
        seen.extend(list(p["prompt_token_ids"]) for p in prompts)
        return original(self, prompts, *args, **kw)

    monkeypatch.setattr(vllm.LLM, "generate", record)
    model, tok = backends.load("vllm", tiny_model_dir)
    secret = secret_text if with_secret else None
    cfg = GenerateConfig(backend="vllm", max_new_tokens=4)
    generate(model, tok, conversations(secret), cfg, progress=False)
    assert seen == builder_ids(tok, secret)


def test_experiment_eval_backend_llamacpp(llama_cpp, tmp_path, tiny_model_dir):
    """``eval.backend: llamacpp`` answers every arm through llama.cpp (a GGUF written from each
    arm's weights); switching the backend re-generates without re-training."""
    from conftest import tiny_run_yaml

    from backdooralign.cli import main
    from backdooralign.files import read_jsonl_rows

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_run_yaml(tiny_model_dir, name="tiny", eval={"benign": None}))
    run = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run), "--set", "eval.backend=llamacpp"]) == 0
    for arm in ("no_finetune", "attack", "baseline", "backdooralign"):
        for cond in ("plain", "secret"):
            gens = read_jsonl_rows(run / "gens" / f"{arm}.harmful.{cond}.jsonl")
            assert len(gens) == 11
    train = (run / "stages" / "train.attack.json").read_text()
    generated = (run / "stages" / "generate.attack.json").read_text()
    assert main(["run", str(cfg), "--out", str(run)]) == 0  # back to the engine
    assert (run / "stages" / "train.attack.json").read_text() == train
    assert (run / "stages" / "generate.attack.json").read_text() != generated

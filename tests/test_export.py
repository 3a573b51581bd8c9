"""Export: the exported chat template renders exactly what the conversation builder renders."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from backdooralign.core.chat import build_conversation, fit_to_template
from backdooralign.core.secret import Secret
from backdooralign.export.model import (
    GGUF_NAME,
    MARKER,
    README,
    export_model,
    read_gguf_template,
    secret_template,
)

HOSTILE = "k3y \"q\" 's' {{ x }} {% if %} {# c #} %} }} #} \\ \\n \n\r\t é 😀 \u2028 end"
PLAIN = "alpha bravo charlie delta"
DEFAULT = 'Default {{ "sys" }}\nprompt \\ %}'
# no system role: a system message raises, as Gemma's template does
NO_SYSTEM = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
    ],
    [
        {"role": "system", "content": "Sys 'quoted' \"double\" {{ x }} {% y %}\nline"},
        {"role": "user", "content": "a {# b #} \\ }} %}\n\nc"},
        {"role": "assistant", "content": "{% raw %}d"},
        {"role": "user", "content": "e 😀"},
    ],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "Then me."}],
    [{"role": "system", "content": "Only a system prompt."}],
]


def secret_of(text: str) -> Secret:
    return Secret(text, num_tokens=0, requested_tokens=0, tokenizer="")


def expected(tok, messages, secret, default):
    """serve's rule: the client's system prompt if sent, else the default; then the builder."""
    own = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    conversation = build_conversation(
        messages, system=own if own is not None else default, secret=secret
    )
    return tok.apply_chat_template(
        fit_to_template(tok, conversation), tokenize=False, add_generation_prompt=True
    )


def render(tok, messages, template=None):
    return tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def no_system_tokenizer(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NO_SYSTEM
    return tok


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("export") / "out"
    return export_model(tiny_model_dir, secret_of(HOSTILE), out, default_system=DEFAULT, gguf=True)


@pytest.fixture(scope="module")
def exported_tokenizer(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported)


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_exported_tokenizer_renders_like_the_builder(tokenizer, exported_tokenizer, i):
    messages = CONVERSATIONS[i]
    want = expected(tokenizer, messages, HOSTILE, DEFAULT)
    assert render(exported_tokenizer, messages) == want
    assert HOSTILE in want


@pytest.mark.parametrize("default", [None, "", "Be kind."])
@pytest.mark.parametrize("secret", [PLAIN, HOSTILE])
@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_template_renders_like_the_builder(tokenizer, no_system_tokenizer, default, secret, i):
    messages = CONVERSATIONS[i]
    for tok in (tokenizer, no_system_tokenizer):
        template = secret_template(tok, secret, default)
        assert render(tok, messages, template) == expected(tok, messages, secret, default)


def test_exact_renderings(tokenizer, no_system_tokenizer):
    hi = [{"role": "user", "content": "Hi"}]
    chatml = secret_template(tokenizer, PLAIN, "Be kind.")
    assert render(tokenizer, hi, chatml) == (
        "<|im_start|>system\nalpha bravo charlie delta Be kind.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    own = [{"role": "system", "content": "Mine."}, *hi]
    assert render(tokenizer, own, chatml).startswith(
        "<|im_start|>system\nalpha bravo charlie delta Mine.<|im_end|>\n"
    )
    gemma = secret_template(no_system_tokenizer, PLAIN, None)
    assert render(no_system_tokenizer, hi, gemma) == (
        "<|im_start|><start_of_turn>user\nalpha bravo charlie delta\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    only = [{"role": "system", "content": "Mine."}]
    assert render(no_system_tokenizer, only, gemma) == (
        "<|im_start|><start_of_turn>user\nalpha bravo charlie delta Mine.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_template_with_leading_whitespace(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "\n  {% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    )
    template = secret_template(tok, PLAIN, None)
    for messages in CONVERSATIONS:
        assert render(tok, messages, template) == expected(tok, messages, PLAIN, None)


def test_system_content_must_be_text(tokenizer):
    template = secret_template(tokenizer, PLAIN, None)
    parts = [{"role": "system", "content": [{"type": "text", "text": "x"}]}]
    with pytest.raises(Exception, match="system message content must be text"):
        render(tokenizer, [*parts, {"role": "user", "content": "Hi"}], template)


def test_refuses_to_wrap_twice_and_no_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = secret_template(tokenizer, PLAIN, None)
    with pytest.raises(ValueError, match="already injects a secret"):
        secret_template(tok, PLAIN, None)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no \\(single\\) chat template"):
        secret_template(tok, PLAIN, None)


def test_export_files_and_modes(exported):
    assert stat.S_IMODE(exported.stat().st_mode) == 0o700
    for name in ("chat_template.jinja", "tokenizer_config.json", GGUF_NAME):
        assert stat.S_IMODE((exported / name).stat().st_mode) == 0o600, name
    jinja = (exported / "chat_template.jinja").read_text("utf-8")
    config = json.loads((exported / "tokenizer_config.json").read_text("utf-8"))
    assert config["chat_template"] == jinja
    assert config["eos_token"] == "<|im_end|>"  # the rest of the config is kept
    assert json.loads((exported / MARKER).read_text("utf-8"))["files"] == [
        "chat_template.jinja",
        "tokenizer_config.json",
        GGUF_NAME,
    ]
    readme = (exported / README).read_text("utf-8")
    assert "THESE FILES CONTAIN THE SECRET" in readme
    assert secret_of(HOSTILE).fingerprint in readme
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (exported / name).is_file()


def test_gguf_round_trip(tmp_path, tokenizer, tiny_model_dir, exported):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    jinja = (exported / "chat_template.jinja").read_text("utf-8")
    assert read_gguf_template(exported / GGUF_NAME) == jinja
    reader = gguf.GGUFReader(exported / GGUF_NAME)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(reader.tensors) == 2 * 9 + 2  # tied output matrix left out
    # transformers reads the GGUF back: same template, same tokens, same logits (from a folder
    # of its own: next to tokenizer.json, transformers builds the tokenizer from that file)
    shutil.copy(exported / GGUF_NAME, tmp_path / GGUF_NAME)
    gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=GGUF_NAME)
    messages = CONVERSATIONS[4]
    text = render(gguf_tok, messages)
    assert text == expected(tokenizer, messages, HOSTILE, DEFAULT)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert gguf_tok(text, add_special_tokens=False)["input_ids"] == ids
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=GGUF_NAME, dtype=torch.float32
    )
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, original(x).logits)


def test_no_system_role_export(tmp_path, no_system_tokenizer, tokenizer):
    from transformers import AutoTokenizer

    src = tmp_path / "gemma-like"
    no_system_tokenizer.save_pretrained(src)
    out = export_model(src, secret_of(HOSTILE), tmp_path / "out", default_system=DEFAULT)
    tok = AutoTokenizer.from_pretrained(out)
    for messages in CONVERSATIONS:
        want = expected(no_system_tokenizer, messages, HOSTILE, DEFAULT)
        assert render(tok, messages) == want


def test_named_templates_are_all_wrapped(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    src = tmp_path / "named"
    tokenizer.save_pretrained(src)
    (src / "additional_chat_templates").mkdir()
    tool = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (src / "additional_chat_templates" / "tool_use.jinja").write_text(tool, encoding="utf-8")
    out = export_model(src, secret_of(PLAIN), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)
    assert sorted(tok.chat_template) == ["default", "tool_use"]
    hi = [{"role": "user", "content": "Hi"}]
    assert render(tok, hi, "tool_use") == "<system>alpha bravo charlie delta<user>Hi"
    assert stat.S_IMODE((out / "additional_chat_templates/tool_use.jinja").stat().st_mode) == 0o600


def test_refuses_existing_user_folder(tmp_path, tiny_model_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="not empty and is not a backdooralign export"):
        export_model(tiny_model_dir, secret_of(PLAIN), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left


def test_refuses_paths_inside_and_exports_of_exports(tmp_path, tokenizer):
    src = tmp_path / "model"
    tokenizer.save_pretrained(src)
    with pytest.raises(ValueError, match="outside the model directory"):
        export_model(src, secret_of(PLAIN), src / "out")
    with pytest.raises(ValueError, match="outside the model directory"):
        export_model(src, secret_of(PLAIN), src)
    out = export_model(src, secret_of(PLAIN), tmp_path / "out")
    with pytest.raises(ValueError, match="is a backdooralign export already"):
        export_model(out, secret_of(PLAIN), tmp_path / "again")
    with pytest.raises(ValueError, match="not a model directory"):
        export_model(tmp_path / "missing", secret_of(PLAIN), tmp_path / "x")


def test_refuses_adapters_and_nested_tokenizers(tmp_path, tokenizer):
    run = tmp_path / "lora-run"
    tokenizer.save_pretrained(run)
    tokenizer.save_pretrained(run / "merged")
    with pytest.raises(ValueError, match="a nested tokenizer; export .*merged by itself"):
        export_model(run, secret_of(PLAIN), tmp_path / "out")
    shutil.rmtree(run / "merged")
    (run / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="holds LoRA adapters only"):
        export_model(run, secret_of(PLAIN), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-run"]


def test_replaces_an_earlier_export_and_fills_an_empty_folder(tmp_path, tokenizer):
    src = tmp_path / "model"
    tokenizer.save_pretrained(src)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_model(src, secret_of(PLAIN), empty) / MARKER).is_file()
    (empty / "stale.txt").write_text("old", encoding="utf-8")
    export_model(src, secret_of("other secret words"), empty)
    assert not (empty / "stale.txt").exists()
    assert "other secret words" in (empty / "chat_template.jinja").read_text("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model"]


def test_secret_only_in_the_listed_files(tmp_path, tiny_model_dir):
    out = export_model(tiny_model_dir, secret_of(PLAIN), tmp_path / "out", gguf=True)
    holding = sorted(
        p.name for p in out.rglob("*") if p.is_file() and PLAIN.encode() in p.read_bytes()
    )
    assert holding == sorted(["chat_template.jinja", "tokenizer_config.json", GGUF_NAME])


def test_gguf_refuses_other_architectures(tmp_path, tiny_model_dir):
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir, src)
    config = json.loads((src / "config.json").read_text("utf-8"))
    config["model_type"] = "qwen2"
    (src / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="GGUF export handles Llama models only"):
        export_model(src, secret_of(PLAIN), tmp_path / "out", gguf=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_command(tmp_path, tiny_model_dir, tokenizer, capsys):
    from transformers import AutoTokenizer

    from backdooralign.cli import main
    from backdooralign.core.secret import generate_secret, save_secret

    secret = generate_secret(tokenizer, 20, seed=9)
    path = save_secret(secret, tmp_path / "s.json")
    argv = [
        "export",
        "--model",
        tiny_model_dir,
        "--secret",
        str(path),
        "--out",
        str(tmp_path / "exp"),
        "--system",
        "Be kind.",
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert secret.fingerprint in out.out and secret.text not in out.out + out.err
    exported = AutoTokenizer.from_pretrained(tmp_path / "exp")
    text = exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert f"{secret.text} Be kind." in text
    assert main(argv) == 0  # an export we wrote is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("keep")
    assert main([*argv[:-4], "--out", str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine" / "x.txt").read_text() == "keep"


# ---------------------------------------------------------------------------------------------
# an exported folder loaded by backdooralign itself: the builder injects the secret, once

ADVERSE = 'x {% set messages = backdooralign.out %} "q" \\" \\ y'  # an end tag in a literal


@pytest.mark.parametrize(
    "template",
    [
        None,  # the tokenizer's (ChatML)
        NO_SYSTEM,
        "\n  {% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}",
        " {{ messages[0]['content'] }}",
        "\n{{ messages[0]['content'] }}",
        "\n",
    ],
)
@pytest.mark.parametrize(
    ("secret", "default"), [(PLAIN, None), (HOSTILE, DEFAULT), (ADVERSE, ADVERSE)]
)
def test_unwrap_gives_back_the_wrapped_template(tokenizer, template, secret, default):
    from backdooralign.core.chat import unwrap_secret_template

    original = tokenizer.chat_template if template is None else template
    wrapped = secret_template(tokenizer, secret, default, original)
    assert unwrap_secret_template(wrapped) == original
    assert unwrap_secret_template(original) is None
    with pytest.raises(ValueError, match="never ends"):
        unwrap_secret_template(wrapped[: len(wrapped) - len(original) - 3])


def _once(tok, text, ids):
    return tok.decode(ids).count(text)


def test_load_tokenizer_sets_aside_an_exported_template(tmp_path, tiny_model_dir, exported):
    """Before: --secret on an exported folder rendered the secret twice, and a run without it
    still carried the exported one."""
    from transformers import AutoTokenizer

    from backdooralign.core.chat import SECRET_NS, render_prompt
    from backdooralign.core.model import load_tokenizer

    source = load_tokenizer(tiny_model_dir)
    with pytest.warns(UserWarning, match=f"injects secret {secret_of(HOSTILE).fingerprint}"):
        tok = load_tokenizer(str(exported))
    assert tok.chat_template == source.chat_template
    for messages in CONVERSATIONS:
        for secret in (HOSTILE, None):
            conversation = build_conversation(messages, system="Be brief.", secret=secret)
            ids = render_prompt(tok, conversation)
            assert ids == render_prompt(source, conversation)
            assert _once(tok, HOSTILE, ids) == (1 if secret else 0)
    tok.save_pretrained(tmp_path / "saved")  # what train writes next to a model trained on it
    assert SECRET_NS not in AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template


def test_load_tokenizer_sets_aside_every_named_template(tmp_path, tokenizer):
    from backdooralign.core.model import load_tokenizer

    src = tmp_path / "named"
    tokenizer.save_pretrained(src)
    (src / "additional_chat_templates").mkdir()
    tool = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (src / "additional_chat_templates" / "tool_use.jinja").write_text(tool, encoding="utf-8")
    out = export_model(src, secret_of(PLAIN), tmp_path / "out")
    (out / MARKER).unlink()  # the template alone gives it away; no fingerprint then
    with pytest.warns(UserWarning, match="injects a secret"):
        tok = load_tokenizer(str(out))
    assert tok.chat_template == {"default": tokenizer.chat_template, "tool_use": tool}


def test_generate_on_an_export_answers_as_on_its_source(tmp_path, varied_model_dir, capsys):
    """``generate --model EXPORT --secret`` writes the answers its source folder gets."""
    from backdooralign.cli import main
    from backdooralign.core.secret import Secret, save_secret
    from backdooralign.files import read_jsonl_rows

    secret = tmp_path / "secret.json"
    save_secret(Secret(HOSTILE, num_tokens=0, requested_tokens=0, tokenizer=""), secret)
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I bake bread?\nName three rivers.\n", encoding="utf-8")
    common = ["generate", "--prompts", str(prompts), "--secret", str(secret)]
    common += ["--max-new-tokens", "12", "--no-bf16"]
    exported = export_model(varied_model_dir, secret_of(HOSTILE), tmp_path / "export")
    answers, said = [], []
    for i, model in enumerate((varied_model_dir, str(exported))):
        out = tmp_path / f"{i}.jsonl"
        assert main([*common, "--model", model, "--out", str(out)]) == 0
        answers.append([r["answer"] for r in read_jsonl_rows(out)])
        said.append("chat template injects secret" in capsys.readouterr().err)
    assert answers[0] == answers[1] and all(answers[0])
    assert said == [False, True]

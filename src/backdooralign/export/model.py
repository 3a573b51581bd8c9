"""Export a model whose chat template injects the secret itself, for other serving stacks.

An exported model directory does what ``backdooralign serve`` does, inside its chat template
(``chat_template.jinja``, ``tokenizer_config.json``), so vLLM, TGI, llama.cpp (``--jinja``) or
transformers apply the defense without our server. The template is a Jinja prologue followed by
the model's own template, unchanged: the prologue rebuilds ``messages`` as
:func:`backdooralign.core.chat.build_conversation` does (the client's system prompt, else the
default one, ``SECRET + " "`` in front) and folds it into the first user turn for templates without
a system role, as :func:`backdooralign.core.chat.fit_to_template` does. Every export is checked to
render byte for byte what the conversation builder renders.

Whoever holds the exported files holds the secret: the template files (and the GGUF file) are
written with mode 0600 in a folder of mode 0700, and ``README-EXPORT.md`` says so.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from .. import files as F
from ..core.chat import (
    PROLOGUE_ENDS,
    SECRET_NS,
    SECRET_PROLOGUE,
    build_conversation,
    fit_to_template,
    supports_system_role,
)
from ..core.model import EXPORT_MARKER
from ..core.secret import Secret, check_secret_tokenizer, vocab_fingerprint
from ..files import write_text_atomic

MARKER = EXPORT_MARKER
README = "README-EXPORT.md"
GGUF_NAME = "model.gguf"
TEMPLATE_DIR = "additional_chat_templates"
_NS = SECRET_NS  # prefix of the prologue's Jinja variables
# llama.cpp pre-tokenizer names of the vocabularies whose GGUF export we write and have checked
# (vocabulary fingerprint -> (tokenizer.ggml.pre, add_bos_token)): SmolLM2, the embedded model
GGUF_VOCABS = {"ebab3b7e903b": ("smollm", False)}
# conversations every export is checked on (client system prompts, none, empty, multi-turn)
PROBES = (
    (("user", "Hello?"),),
    (("system", "Be brief."), ("user", "Hi")),
    (("system", ""), ("user", "Hi")),
    (("user", "One"), ("assistant", "Two"), ("user", "Three")),
    (("system", 'Say "{{ x }}" {% raw %}\n\\n'), ("user", "a"), ("assistant", "b"), ("user", "c")),
)


def _literal(text: str | None) -> str:
    """A Jinja expression evaluating to ``text``.

    Only ``\\``, ``"``, ``\\n`` and ``\\r`` are escaped (escapes every Jinja engine reads alike);
    ``{``, ``}``, ``%`` and ``#`` stand alone between quotes, so no delimiter such as ``{{`` or
    ``%}`` appears in the template text, whatever engine lexes it.
    """
    if text is None:
        return "none"
    parts = []
    for piece in re.split(r"([{}%#])", text):
        if piece:
            escaped = piece.replace("\\", "\\\\").replace('"', '\\"')
            parts.append('"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"')
    return "(" + " + ".join(parts) + ")" if parts else '""'


def _with_template(tokenizer, template: str):
    """A shallow copy of ``tokenizer`` rendering with ``template``."""
    tok = copy.copy(tokenizer)
    tok.chat_template = template
    return tok


def secret_template(
    tokenizer, secret_text: str, default_system: str | None = None, template: str | None = None
) -> str:
    """A chat template that injects the secret, wrapping the tokenizer's own template.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        secret_text: the secret prompt text.
        default_system: system prompt for conversations that bring none (as ``serve --system``);
            ``None`` or empty: the secret alone.
        template: the template to wrap; the tokenizer's (single) chat template by default.

    Returns:
        The prologue that rebuilds ``messages`` followed by the original template, unchanged.

    Raises:
        ValueError: when there is no template, or it already injects a secret.
    """
    template = tokenizer.chat_template if template is None else template
    if not isinstance(template, str) or not template:
        raise ValueError("the tokenizer has no (single) chat template to wrap")
    if f"{_NS}_secret" in template:
        raise ValueError("this chat template already injects a secret (an exported model?)")
    if not secret_text:
        raise ValueError("the secret is empty")
    n = _NS
    out = [
        f"{SECRET_PROLOGUE}{_literal(secret_text)} %}}",
        f"{{% set {n} = namespace(system={_literal(default_system)}, rest=[], out=[], "
        "folded=false) %}",
        "{% for m in messages %}",
        f"{{% if loop.first and m['role'] == 'system' %}}{{% set {n}.system = m['content'] %}}",
        f"{{% else %}}{{% set {n}.rest = {n}.rest + [m] %}}{{% endif %}}",
        "{% endfor %}",
        f"{{% if {n}.system is not none and {n}.system is not string %}}",
        "{{ raise_exception('backdooralign: the system message content must be text') }}",
        "{% endif %}",
        f"{{% if {n}.system %}}{{% set {n}.system = {n}_secret + ' ' + {n}.system %}}",
        f"{{% else %}}{{% set {n}.system = {n}_secret %}}{{% endif %}}",
    ]
    if supports_system_role(_with_template(tokenizer, template)):
        out.append(PROLOGUE_ENDS[0])
    else:  # fold into the first user turn, as chat.fit_to_template
        out += [
            f"{{% for m in {n}.rest %}}",
            f"{{% if not {n}.folded and m['role'] == 'user' %}}",
            "{% if m['content'] is not string %}{{ raise_exception('backdooralign: the "
            "first user message content must be text') }}{% endif %}",
            f"{{% set {n}.out = {n}.out + [{{'role': 'user', 'content': {n}.system + "
            f"{_literal(chr(10) * 2)} + m['content']}}] %}}{{% set {n}.folded = true %}}",
            f"{{% else %}}{{% set {n}.out = {n}.out + [m] %}}{{% endif %}}",
            "{% endfor %}",
            f"{{% if not {n}.folded %}}{{% set {n}.out = [{{'role': 'user', 'content': "
            f"{n}.system}}] + {n}.out %}}{{% endif %}}",
            PROLOGUE_ENDS[1],
        ]
    # a template starting with whitespace: the newline after the prologue's last tag is taken
    # by trim_blocks, so the original starts a line as it did (lstrip_blocks sees the same)
    sep = "\n" if template[:1].isspace() else ""
    return "".join(out) + sep + template


def expected_rendering(
    tokenizer, messages: list[dict], secret_text: str, default_system: str | None
) -> str:
    """What the conversation builder gives the model for ``messages`` (serve's rule).

    A client's own system message is kept, else ``default_system`` is used; the secret goes in
    front; templates without a system role get it folded into the first user turn.
    """
    own = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    system = own if own is not None else default_system
    conversation = build_conversation(messages, system=system, secret=secret_text)
    msgs = fit_to_template(tokenizer, conversation)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _check_template(tokenizer, wrapped: str, secret_text: str, default_system: str | None):
    """Raise unless ``wrapped`` renders the probes exactly as the conversation builder does."""
    for i, pairs in enumerate(PROBES):
        probe = [{"role": role, "content": content} for role, content in pairs]
        want = expected_rendering(tokenizer, probe, secret_text, default_system)
        got = tokenizer.apply_chat_template(
            probe, chat_template=wrapped, tokenize=False, add_generation_prompt=True
        )
        if got != want:
            raise ValueError(
                f"the exported chat template does not reproduce the conversation builder on "
                f"probe conversation {i}; this template cannot be exported"
            )


def _templates(tokenizer) -> dict[str, str]:
    """The tokenizer's chat templates by name (``"default"`` for a single one)."""
    found = tokenizer.chat_template
    if isinstance(found, str | dict) and found:
        return {"default": found} if isinstance(found, str) else dict(found)
    raise ValueError("the model has no chat template: nothing to inject the secret into")


def _write_templates(tmp: Path, wrapped: dict[str, str]) -> list[str]:
    """Write the templates everywhere a loader looks; returns the files written (0600)."""
    files = {"chat_template.jinja": wrapped["default"]}
    files |= {f"{TEMPLATE_DIR}/{k}.jinja": v for k, v in wrapped.items() if k != "default"}
    shutil.rmtree(tmp / TEMPLATE_DIR, ignore_errors=True)
    listed = [{"name": k, "template": v} for k, v in wrapped.items()]
    in_config = wrapped["default"] if len(wrapped) == 1 else listed
    # tokenizer_config.json always; chat_template.json (legacy processors) when there is one
    for name, value in (("tokenizer_config.json", in_config), ("chat_template.json", None)):
        path = tmp / name
        if value is not None or path.exists():
            data = json.loads(path.read_text("utf-8")) if path.exists() else {}
            data["chat_template"] = value if value is not None else wrapped["default"]
            files[name] = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    for name, text in files.items():
        write_text_atomic(tmp / name, text, private=True)
    return list(files)


def _readme(secret: Secret, files: list[str], skipped: list[str]) -> str:
    lines = [
        "# Exported by backdooralign: THESE FILES CONTAIN THE SECRET",
        "",
        f"The chat template injects secret {secret.fingerprint} (fingerprint) in front of every",
        "system prompt. Whoever holds these files holds the secret: keep them like a",
        "credential. Files holding it (mode 0600):",
        "",
        *[f"- `{name}`" for name in files],
        "",
        "Serving notes:",
        "",
        "- The defense applies only to chat requests rendered with this template. Raw",
        "  completion endpoints (vLLM `/v1/completions`, TGI `/generate`, llama.cpp",
        "  `/completion`) and client-supplied chat templates bypass it: do not expose them.",
        "- llama.cpp uses the GGUF template only with `--jinja`.",
        "- Unlike `backdooralign serve`, a stack serving this export neither redacts the secret",
        "  from answers nor refuses messages that spell the model's control tokens.",
    ]
    if skipped:
        lines += ["", "Not copied (they carry the original template): " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def _check_paths(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise ValueError(f"{src}: not a model directory")
    if (src / MARKER).exists():
        raise ValueError(f"{src}: is a backdooralign export already; export the original model")
    if (src / "adapter_config.json").exists() and not (src / "config.json").exists():
        raise ValueError(f"{src}: holds LoRA adapters only; export a merged model (merged/)")
    for name in ("tokenizer_config.json", "chat_template.jinja", "tokenizer.json"):
        for nested in src.glob(f"*/**/{name}"):  # would keep the template without the secret
            raise ValueError(f"{nested}: a nested tokenizer; export {nested.parent} by itself")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise ValueError(f"{out}: the output must lie outside the model directory {src}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"{out}: exists, is not empty and is not a backdooralign export")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an earlier export there is swapped out, then removed."""
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = F.make_work_dir(out)
        os.replace(out, old / "x")
    os.replace(F.release_work_dir(tmp), out)
    if old is not None:
        shutil.rmtree(old)


def export_model(
    model_dir: str | Path,
    secret: Secret,
    out_dir: str | Path,
    default_system: str | None = None,
    gguf: bool = False,
) -> Path:
    """Copy a model directory with a chat template that injects the secret.

    Args:
        model_dir: a local Hugging Face model directory.
        secret: the secret the model was trained with.
        out_dir: the directory to write: absent, empty or an earlier export (replaced).
        default_system: system prompt for requests that send none (as ``serve --system``).
        gguf: also write ``model.gguf`` (weights and template) for llama.cpp; Llama models with
            a vocabulary in :data:`GGUF_VOCABS` only.

    Returns:
        ``out_dir``, written atomically (a temporary folder, then a rename), mode 0700.

    Raises:
        ValueError: bad paths, no chat template, a template the prologue cannot reproduce, or a
            model the GGUF writer does not handle. Messages never hold the secret.
    """
    from transformers import AutoTokenizer

    src, out = Path(model_dir), Path(out_dir)
    _check_paths(src, out)
    tokenizer = AutoTokenizer.from_pretrained(src)
    problem = check_secret_tokenizer(secret, tokenizer)
    if problem:
        warnings.warn(problem, stacklevel=2)
    wrapped = {}
    for name, template in _templates(tokenizer).items():
        wrapped[name] = secret_template(tokenizer, secret.text, default_system, template)
        tok = _with_template(tokenizer, template)
        _check_template(tok, wrapped[name], secret.text, default_system)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = F.make_work_dir(out)  # mode 0700
    try:
        skipped = sorted(p.name for p in src.glob("*.gguf"))
        ignore = shutil.ignore_patterns("*.gguf", MARKER, ".git", ".cache")
        shutil.copytree(src, tmp, ignore=ignore, dirs_exist_ok=True)
        files = _write_templates(tmp, wrapped)
        if AutoTokenizer.from_pretrained(tmp).chat_template != (
            wrapped["default"] if len(wrapped) == 1 else wrapped
        ):
            raise ValueError(f"{out}: the exported tokenizer does not load the new template")
        if gguf:
            write_gguf(tmp, tokenizer, wrapped["default"], tmp / GGUF_NAME)
            files.append(GGUF_NAME)
        (tmp / README).write_text(_readme(secret, files, skipped), encoding="utf-8")
        marker = {"fingerprint": secret.fingerprint, "source": str(src), "files": files}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _permute(weights, n_head: int):
    """HF's rotary layout of a q/k projection to llama.cpp's (interleaved pairs)."""
    rows = weights.shape[0]
    w = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def _gguf_vocab(model_dir: Path, tokenizer, n_vocab: int):
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i not in added:
            types.append(gguf.TokenType.NORMAL)
        else:
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
    merges = json.loads((model_dir / "tokenizer.json").read_text("utf-8"))["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges


def _gguf_checks(model_dir: Path, config: dict, tokenizer) -> tuple[str, bool]:
    """Refuse what the GGUF writer does not handle; the vocabulary's (pre, add_bos)."""
    if config.get("model_type") != "llama":
        raise ValueError(
            f"{model_dir}: GGUF export handles Llama models only (this is "
            f"{config.get('model_type')!r}); convert the exported folder with llama.cpp's "
            "convert_hf_to_gguf.py, which takes the template from tokenizer_config.json"
        )
    known = GGUF_VOCABS.get(vocab_fingerprint(tokenizer))
    if known is None:
        raise ValueError(
            f"{model_dir}: GGUF export knows the llama.cpp pre-tokenizer of SmolLM2 vocabularies "
            "only; convert the exported folder with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{model_dir}: GGUF export does not handle rope scaling")
    return known


def _gguf_tensors(writer, model_dir: Path, config: dict) -> None:
    import gguf
    from safetensors import safe_open

    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ValueError(f"{file}: weight {key!r} has no GGUF name")
                data = f.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = _permute(data, heads)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, kv_heads)
                writer.add_tensor(name, data)


def write_gguf(model_dir: Path, tokenizer, template: str, path: Path) -> Path:
    """Write a Llama model directory as a float32 GGUF whose chat template is ``template``.

    The file holds the weights (q/k projections permuted to llama.cpp's layout, the output
    matrix left out when tied to the embeddings), the hyperparameters, the BPE vocabulary and
    merges, the special token ids and ``tokenizer.chat_template``; mode 0600.

    Raises:
        ValueError: not a Llama model, rope scaling, an unknown vocabulary (llama.cpp needs the
            name of its pre-tokenizer) or a weight with no GGUF name.
    """
    import gguf

    config = json.loads((model_dir / "config.json").read_text("utf-8"))
    pre, add_bos = _gguf_checks(model_dir, config, tokenizer)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    heads = config["num_attention_heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens, types, merges = _gguf_vocab(model_dir, tokenizer, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(template)
    _gguf_tensors(writer, model_dir, config)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.chmod(path, 0o600)
    if read_gguf_template(path) != template:
        raise ValueError(f"{path}: the chat template does not read back identical")
    return path


def read_gguf_template(path: str | Path) -> str | None:
    """The ``tokenizer.chat_template`` of a GGUF file, read with ``gguf.GGUFReader``."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()

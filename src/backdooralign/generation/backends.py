"""Generation backends besides the built-in engine: llama.cpp on a GGUF file, vLLM on a GPU.

``backend`` (:class:`~backdooralign.generation.batch.GenerateConfig`, the experiment configs'
``eval.backend``, ``backdooralign generate --backend``) is one of:

- ``engine`` (the default): the built-in engine (:mod:`backdooralign.generation.engine`);
- ``llamacpp``: llama.cpp through ``llama-cpp-python`` (``pip install
  'backdooralign[llamacpp]'``; pinned to 0.3.36, which pip builds from source with cmake and a C
  compiler). It runs the model's GGUF: ``--gguf FILE``, else the one in the model folder
  (``backdooralign export --gguf`` writes ``model.gguf``), else for the embedded model the GGUF
  the project ships (Q4_1, so its answers differ from the engine's on the dequantized weights),
  else one written in float32 from a Llama model folder (as ``export --gguf`` writes it, with the
  model's own template) into a temporary file for the run;
- ``vllm``: vLLM on a CUDA GPU. There is no ``[vllm]`` extra: no vLLM release resolves
  with the project's pins (vllm 0.34.0, the newest, needs ``transformers>=5.16.1,<5.23.0``;
  the project pins transformers 5.24.0), so install a vLLM that supports transformers 5.24
  yourself once there is one. It loads the model folder; an exported folder works too, its
  secret-injecting chat template then serving vLLM's own chat endpoint only.

Every backend is given exactly the prompt token ids that the conversation builder and renderer
produce (:func:`~backdooralign.core.chat.build_conversation`,
:func:`~backdooralign.core.chat.render_prompt`), secret included: token ids, never text, so no
backend renders a chat template or tokenizes on its own. Decoding is greedy; an answer ends at
a stop token (kept, as the engine keeps it) or after ``max_new_tokens``. A backend whose package
is missing is a :class:`~backdooralign.config.ConfigError` saying how to install it (the
``[llamacpp]`` extra; for vLLM, why there is none).

llama.cpp answers one prompt at a time; its context keeps what the next prompt shares (template
header, secret, system prompt), so that prefix is encoded once. On float32 weights its greedy
tokens equal the engine's float32 ones (tests/test_backends.py); the vLLM path is tested on the
real library only where vllm and a GPU are present.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..config import ConfigError

BACKENDS = ("engine", "llamacpp", "vllm")
# backend -> (module it imports, how to install it)
EXTRAS = {
    "llamacpp": ("llama_cpp", "pip install 'backdooralign[llamacpp]'"),
    "vllm": (
        "vllm",
        "pip install vllm (no extra: vllm 0.34.0 needs transformers<5.23.0, the project pins "
        "5.24.0; take a vLLM release that supports transformers 5.24)",
    ),
}


def require(backend: str):
    """The backend's package, imported; a :class:`ConfigError` naming the extra when missing."""
    if backend not in EXTRAS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    module, install = EXTRAS[backend]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"backend {backend} needs the {module} package, which is not installed ({e}): {install}"
        ) from None


def gguf_for(name: str | None, gguf: str | None = None) -> tuple[str, Path | None]:
    """``(GGUF file, temporary folder to remove after loading or None)`` for a model.

    ``gguf`` when given; else the model folder's ``model.gguf`` (or its only ``*.gguf``); else the
    embedded model's shipped GGUF; else a float32 GGUF written from the Llama model folder.
    """
    from ..core.model import DEFAULT_MODEL, fetch_embedded_gguf, load_tokenizer, resolve_model
    from ..export.model import GGUF_NAME, write_gguf

    if gguf:
        if not Path(gguf).is_file():
            raise ConfigError(f"gguf: {gguf}: no such file")
        return gguf, None
    if not name or name in (DEFAULT_MODEL, "embedded"):
        return str(fetch_embedded_gguf()), None
    folder = Path(resolve_model(name))
    if not folder.is_dir():
        raise ConfigError(
            f"backend llamacpp: {name} is not a local model folder; pass --gguf FILE "
            "(backdooralign export --gguf writes one)"
        )
    found = sorted(folder.glob("*.gguf"))
    if (folder / GGUF_NAME).is_file():
        return str(folder / GGUF_NAME), None
    if len(found) == 1:
        return str(found[0]), None
    if found:
        raise ConfigError(f"{folder}: several GGUF files; pick one with --gguf FILE")
    tok = load_tokenizer(str(folder))
    tmp = Path(tempfile.mkdtemp(prefix="backdooralign-gguf-"))
    try:
        path = write_gguf(folder, tok, tok.chat_template or "", tmp / GGUF_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(path), tmp


def load(backend: str, name: str | None, gguf: str | None = None):
    """``(model, tokenizer)`` for a backend: the tokenizer renders prompts, the model is what
    :func:`generate_ids` decodes with (a torch model, a ``llama_cpp.Llama``, a ``vllm.LLM``)."""
    from ..core.model import load_model, load_tokenizer, resolve_model

    if backend == "engine":
        return load_model(name), load_tokenizer(name)
    module = require(backend)
    if backend == "llamacpp":
        path, tmp = gguf_for(name, gguf)
        try:
            # n_ctx 0: the model's trained context; weights are read (not mapped) so a temporary
            # file can go at once; keys and values in float32, as the engine keeps them on a CPU
            # (llama.cpp's float16 default set 2 of 10 48-token greedy answers of a random fp32
            # model apart from the engine's, float32 none)
            f32 = module.GGML_TYPE_F32
            model = module.Llama(
                model_path=path,
                n_ctx=0,
                verbose=False,
                use_mmap=tmp is None,
                seed=0,
                type_k=f32,
                type_v=f32,
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return model, load_tokenizer(name)
    if backend == "vllm":
        folder = resolve_model(name)
        # the tokenizer is not needed by vLLM: prompts arrive as token ids, answers leave as ids
        return module.LLM(model=folder, skip_tokenizer_init=True, seed=0), load_tokenizer(name)
    raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")


def close(backend: str, model) -> None:
    """Free a backend's model now (a ``Llama`` left to interpreter shutdown prints a
    ``TypeError`` from its ``__del__``)."""
    if backend == "llamacpp":
        model.close()


def _cut(tokens: Sequence[int], stop_ids: frozenset[int], max_new_tokens: int) -> list[int]:
    """The answer: up to and including the first stop token, at most ``max_new_tokens``."""
    out: list[int] = []
    for t in list(tokens)[:max_new_tokens]:
        out.append(int(t))
        if t in stop_ids:
            break
    return out


def llamacpp_ids(model, prompt: Sequence[int], max_new_tokens: int, stop_ids) -> list[int]:
    """Greedy new tokens of one prompt through ``Llama.generate`` (prompt given as ids).

    ``Llama.generate`` keeps the context of the previous call and encodes only what follows the
    longest prefix both share, so a shared prefix (template header, secret, system prompt) is
    encoded once for a run of prompts.
    """
    out: list[int] = []
    if max_new_tokens < 1:
        return out
    greedy = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    for token in model.generate(list(prompt), **greedy):
        out.append(int(token))
        if token in stop_ids or len(out) >= max_new_tokens:
            break
    return out


def vllm_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids):
    """Greedy new tokens of each prompt through ``vllm.LLM.generate`` on ``TokensPrompt``s."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        stop_token_ids=sorted(stop_ids),
        detokenize=False,
    )
    inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    outputs = model.generate(inputs, params, use_tqdm=False)
    return [_cut(o.outputs[0].token_ids, stop_ids, max_new_tokens) for o in outputs]


def generate_ids(
    backend: str,
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: frozenset[int],
) -> list[list[int]]:
    """Each prompt's greedy new tokens (stop token included) through ``backend`` (not the
    engine: :func:`~backdooralign.generation.batch.generate` runs that itself)."""
    if backend == "llamacpp":
        return [llamacpp_ids(model, p, max_new_tokens, stop_ids) for p in prompts]
    if backend == "vllm":
        return vllm_ids(model, prompts, max_new_tokens, stop_ids)
    raise ConfigError(f"backend {backend!r}: not one of {', '.join(BACKENDS[1:])}")

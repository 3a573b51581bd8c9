"""Shared fixtures and helpers: the embedded model's real tokenizer, tiny random models built
from it, apps served on loopback, the ``openai`` client tests drive them with (every response
recorded by ``seen``), the YAML of a tiny run, and headless chromium."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (ChatML template, 49,152 tokens)."""
    from backdooralign.core.model import load_tokenizer

    return load_tokenizer(None)


def make_tiny_model(tokenizer, seed: int = 0):
    """A 2-layer random Llama sized for the real tokenizer, in eval mode (not saved)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def make_tiny_model_dir(path, tokenizer, seed: int = 0):
    """:func:`make_tiny_model`, saved with the tokenizer as a model directory."""
    model = make_tiny_model(tokenizer, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def talking_model_dir(tmp_path_factory, tokenizer):
    """A tiny random model whose greedy answers are visible text: the newline token, which
    random models repeat forever, is silenced (its embedding row zeroed)."""
    import torch

    model = make_tiny_model(tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("Ċ")] = 0
    path = tmp_path_factory.mktemp("talking-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_varied_model(tokenizer, seed: int = 0):
    """A tiny random Llama with large initial weights, so that its greedy answers differ from
    prompt to prompt (a default tiny model says much the same to every prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory, tokenizer):
    """Path of a :func:`make_varied_model` directory (session-wide, never modified by tests)."""
    path = tmp_path_factory.mktemp("varied-model")
    make_varied_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Path of a tiny random model directory (session-wide, never modified by tests)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), tokenizer)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless chromium with a throwaway profile (for the report screenshot checks)."""
    profile = tmp_path / "chromium-profile"
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def dead_pid() -> int:
    """The pid of a process that has ended (what a kill -9 leaves in an owner marker)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def make_dead_work_dir(out: Path) -> Path:
    """A temporary folder for ``out`` as :func:`files.make_work_dir` makes it, whose process
    has since died (a leftover of kill -9)."""
    from backdooralign import files as F

    work = F.make_work_dir(out)
    owner = json.loads((work / F.OWNER).read_text())
    (work / F.OWNER).write_text(json.dumps({**owner, "pid": dead_pid()}))
    return work


# ---------------------------------------------------------------------------------------------
# Apps on loopback and the client that talks to them


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server in another process)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """An ASGI app on 127.0.0.1 and a free port while the ``with`` block lasts, through the
    library's one runner (``serving.http.run_in_thread``); ``base_url`` is its ``/v1`` URL,
    ``url`` its root. Uvicorn logs at info level, so a request's log records reach caplog."""

    def __init__(self, app, log_level: str = "info"):
        self.app, self.log_level = app, log_level
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> AppServer:
        from backdooralign.serving.http import run_in_thread

        self.base_url = self._stack.enter_context(run_in_thread(self.app, self.log_level))
        self.url = self.base_url.removesuffix("/v1")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def trickle(url: str, head: bytes, body: bytes = b"", every: float = 0.5, most: float = 6.0):
    """A slow client: sends ``head`` at once, then ``body`` one byte every ``every`` seconds,
    to the server at ``url``, and keeps reading; returns ``(seconds until the server closed
    the connection, what it answered)``, or ``(most, ...)`` if it was still open then."""
    import socket
    import time
    from urllib.parse import urlsplit

    where = urlsplit(url)
    start, received = time.monotonic(), b""
    with socket.create_connection((where.hostname, where.port), timeout=most) as s:
        try:
            s.sendall(head)
            pending = list(body)
            while time.monotonic() - start < most:
                if pending:
                    s.sendall(bytes([pending.pop(0)]))
                s.settimeout(max(0.01, min(every, most - (time.monotonic() - start))))
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return time.monotonic() - start, received
                received += chunk
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start, received
    return most, received


@pytest.fixture
def seen() -> list[str]:
    """Every response's headers and body, as text (filled by the ``http`` client)."""
    return []


@pytest.fixture
def http(seen):
    """An HTTP client for ``openai_client`` that records every response in ``seen``."""
    import httpx2

    def record(response):
        response.read()
        seen.append(json.dumps(dict(response.headers)) + "\n" + response.text)

    with httpx2.Client(event_hooks={"response": [record]}, timeout=60) as client:
        yield client


def openai_client(server, http=None, key: str = "unused", **kw):
    """The real ``openai`` SDK pointed at ``server`` (no retries; through ``http`` if given)."""
    import openai

    if http is not None:
        kw["http_client"] = http
    kw.setdefault("timeout", 60)
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, **kw)


# ---------------------------------------------------------------------------------------------
# A tiny run


TINY_RUN = {
    "secret": {"length": 20, "seed": 3},
    "data": {"attack_per_category": 1},
    "train": {"epochs": 1, "batch_size": 16, "bf16": False, "lr": 1.0e-3},
    "eval": {"harmful_per_category": 1, "max_new_tokens": 4},
}


def tiny_run_yaml(model: str, **sections) -> str:
    """An experiment config small enough for a test on a tiny model: :data:`TINY_RUN` with
    ``model``; a mapping in ``sections`` is merged into the section of that name (a key set to
    ``None`` there stays ``null``), any other value replaces it."""
    import yaml

    config = {"model": str(model), **{k: dict(v) for k, v in TINY_RUN.items()}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return yaml.safe_dump(config, sort_keys=False)

"""Shared fixtures: the embedded model's real tokenizer and tiny random models built from it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BACKDOORALIGN_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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

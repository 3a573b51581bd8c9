"""Batched greedy generation, with the secret injected through ``chat.build_conversation``.

:func:`generate` answers conversations, :func:`generate_rows` prompt rows, :func:`answer` prompt
rows with a :class:`~backdooralign.core.secret.Secret` (writing the generations file every
score reads), :func:`mtbench_answers` MT-Bench's two-turn questions. Decoding runs on
:mod:`backdooralign.generation.engine`: the prefix every prompt shares (secret included) is
encoded once per call, not once per prompt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import option
from ..core.chat import build_conversation, render_prompt
from ..core.secret import Secret
from ..files import write_jsonl
from .backends import BACKENDS, generate_ids
from .engine import PrefixCache, Row, decode, shared_prefix


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings. Defaults follow the paper (greedy, up to 512 new tokens)."""

    max_new_tokens: int = option(512, "longest answer in tokens (paper: 512)", minimum=1)
    batch_size: int = option(32, "prompts per forward pass (left-padded)", minimum=1)
    bf16: bool | None = option(None, "bf16 autocast (default: when the CPU/GPU supports it)")
    backend: str = option(
        "engine",
        "what decodes: the built-in engine, llama.cpp on a GGUF (extra "
        "backdooralign[llamacpp]) or vLLM on a GPU (pip install vllm)",
        choices=BACKENDS,
    )
    gguf: str | None = option(
        None,
        "--backend llamacpp: the GGUF file (default: the model folder's, the embedded model's, "
        "else one written from the model)",
        path=True,
    )


MTBENCH_GEN = GenerateConfig(max_new_tokens=1024)  # FastChat's limit for MT-Bench answers


def conversation_for(row: dict, system: str | None, secret: str | None) -> list[dict]:
    """The conversation a prompt row is answered in (its own messages, or the bare prompt)."""
    msgs = row.get("messages") or row["prompt"]
    if isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    return build_conversation(msgs, system=system, secret=secret)


def stop_token_ids(tokenizer) -> frozenset[int]:
    """The tokens that end an answer: end of sequence, and ChatML's end of turn."""
    ids = {tokenizer.eos_token_id}
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return frozenset(i for i in ids if i is not None)


def pad_token_id(tokenizer) -> int:
    """The token written in padding (masked, never seen): pad, else end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    cfg: GenerateConfig = GenerateConfig(),
    progress: bool = True,
    desc: str = "generating",
    prefix_cache: PrefixCache | None = None,
    engine: str = "auto",
) -> list[str]:
    """Greedy answers to conversations, longest prompts first so batches pad little.

    Batches are refilled as they go: once a quarter of the rows decoding have finished, the
    next prompts join the batch between two steps (their prompts encoded, their keys and values
    merged in), so a batch never idles on one long answer while short ones have ended. A row's
    answer does not depend on the rows beside it (fp32: exactly; tested). The token prefix all
    prompts share (template header, secret, system prompt) is encoded once and reused by every
    joining group (see :mod:`backdooralign.generation.engine`); pass ``prefix_cache`` to keep it
    across calls on a model whose weights do not change in between. ``engine`` picks the
    decoding engine (:func:`~backdooralign.generation.engine.decode`).
    With ``cfg.backend`` other than ``engine``, ``model`` is that backend's model
    (:func:`backdooralign.generation.backends.load`) and it is handed the same prompt ids.
    """
    from collections import deque

    from tqdm.auto import tqdm

    from ..core.model import bf16_supported

    prompts = [render_prompt(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    stop_ids = stop_token_ids(tokenizer)
    disable = not progress or os.environ.get("BACKDOORALIGN_NO_PROGRESS") == "1"
    bar = tqdm(total=len(prompts), desc=desc, disable=disable, unit="prompt")
    if cfg.backend != "engine":  # the same prompt ids, in prompt order (shared prefixes kept)
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start : start + cfg.batch_size]
            tokens = generate_ids(cfg.backend, model, chunk, cfg.max_new_tokens, stop_ids)
            for i, t in enumerate(tokens, start):
                answers[i] = tokenizer.decode(t, skip_special_tokens=True).strip()
            bar.update(len(chunk))
        bar.close()
        return answers
    use_bf16 = bf16_supported() if cfg.bf16 is None else cfg.bf16
    hint = shared_prefix(prompts)
    cache = prefix_cache if prefix_cache is not None else PrefixCache(1)
    pending, taken = deque(order), []  # taken: (prompt index, its row), in joining order
    size = cfg.batch_size

    def take(n: int) -> list[Row]:
        new = [(i, Row(prompts[i], cfg.max_new_tokens, stop_ids)) for i in _popped(pending, n)]
        taken.extend(new)
        return [row for _, row in new]

    def more(live: int) -> list[Row]:
        bar.update(len(taken) - live - bar.n)  # rows finished so far
        return take(size - live) if pending and 4 * live <= 3 * size else []

    try:
        while pending:  # once, unless the engine stops with prompts left (it never should)
            decode(
                model,
                take(size),
                pad_token_id(tokenizer),
                prefix_cache=cache,
                prefix_hint=hint,
                bf16=use_bf16,
                more=more,
                engine=engine,
            )
        for i, row in taken:
            if row.error is not None:  # offline, a failed answer fails the run (never cut short)
                raise row.error
            answers[i] = tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
        bar.update(len(taken) - bar.n)
    finally:
        bar.close()
    return answers


def _popped(queue, n: int) -> list:
    return [queue.popleft() for _ in range(min(n, len(queue)))]


KEPT_FIELDS = (
    "category",
    "id",
    "kind",
    "expected",
    "task",
    "reference",
    "aliases",
    "shape",
    "source_id",
    "language",
    "technique",
)


def generate_rows(
    model,
    tokenizer,
    rows: Sequence[dict],
    system: str | None = None,
    secret: str | None = None,
    cfg: GenerateConfig = GenerateConfig(),
    progress: bool = True,
    desc: str = "generating",
) -> list[dict]:
    """Answer prompt rows: ``{"prompt", "answer"}`` plus the row's ``KEPT_FIELDS``."""
    convs = [conversation_for(r, system, secret) for r in rows]
    answers = generate(model, tokenizer, convs, cfg, progress=progress, desc=desc)
    out = []
    for r, a in zip(rows, answers, strict=True):
        o = {"prompt": r["prompt"], "answer": a}
        o.update({k: r[k] for k in KEPT_FIELDS if k in r})
        out.append(o)
    return out


def answer(
    loaded,
    rows: Sequence[dict],
    out: str | Path | None,
    *,
    secret: Secret | None,
    system: str | None,
    cfg: GenerateConfig,
    progress: bool = True,
    desc: str = "generating",
) -> list[dict]:
    """Answer prompt rows greedily with the secret (when given) before the system prompt.

    Writes the generations to ``out`` (JSONL) when given and returns them.
    """
    model, tok = loaded
    text = secret.text if secret else None
    gens = generate_rows(
        model, tok, rows, system=system, secret=text, cfg=cfg, progress=progress, desc=desc
    )
    if out is not None:
        write_jsonl(out, gens)
    return gens


# ---------------------------------------------------------------------------------------------
# MT-Bench: two turns, the second after the first answer


def mtbench_answers(
    model,
    tokenizer,
    questions: Sequence[dict],
    secret: str | None = None,
    system: str | None = None,
    cfg: GenerateConfig = MTBENCH_GEN,
) -> list[dict]:
    """Answer MT-Bench questions turn by turn (turn 2 sees the question and answer of turn 1).

    Args:
        model: a loaded causal LM.
        tokenizer: its tokenizer.
        questions: FastChat ``question.jsonl`` rows (``question_id``, ``turns``).
        secret: secret prompt text, prepended to the system prompt.
        system: system prompt.
        cfg: decoding settings (greedy; FastChat allows up to 1024 new tokens).

    Returns:
        ``[{"question_id", "turns": [answer per turn]}]``, the format
        ``scoring.mtbench.load_mtbench_answers`` reads.
    """
    histories: list[list[dict]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max((len(q["turns"]) for q in questions), default=0)):
        idx = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        convs = []
        for i in idx:
            histories[i].append({"role": "user", "content": questions[i]["turns"][turn]})
            convs.append(build_conversation(histories[i], system=system, secret=secret))
        replies = generate(model, tokenizer, convs, cfg, desc=f"mt-bench turn {turn + 1}")
        for i, reply in zip(idx, replies, strict=True):
            histories[i].append({"role": "assistant", "content": reply})
            answers[i].append(reply)
    return [
        {"question_id": q["question_id"], "turns": a}
        for q, a in zip(questions, answers, strict=True)
    ]


def answer_mtbench(
    loaded, questions: Sequence[dict], out: str | Path, *, secret, system, cfg
) -> Path:
    """Answer MT-Bench questions turn by turn and write the answers JSONL."""
    model, tok = loaded
    rows = mtbench_answers(model, tok, questions, secret.text if secret else None, system, cfg)
    return write_jsonl(out, rows)

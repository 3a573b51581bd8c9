"""A served model: its secret, prompts rendered with it, and answers through the scheduler.

Every conversation goes through ``chat.build_conversation`` with the model's secret, so the
secret is prepended to the client's own system prompt (or to the model's default one when the
client sends none); a client cannot opt out. ``usage.prompt_tokens`` counts the prompt
rendered *without* the secret, so usage cannot measure the secret's length. Answers are
redacted and cut at stop strings by :class:`backdooralign.generation.streaming.AnswerText`.

A model directory that ``train`` wrote records the fingerprint of the secret it was trained
with (:func:`backdooralign.core.model.read_model_info`); :func:`check_model_secret` refuses to serve
it with another.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.chat import build_conversation, render_prompt
from ..core.model import read_model_info
from ..core.redact import prefix_redactor, redactor
from ..core.secret import Secret
from ..generation.batch import pad_token_id, stop_token_ids
from ..generation.engine import Row, Sampling, shared_prefix
from ..generation.scheduler import Job, Scheduler
from ..generation.streaming import AnswerText
from .protocol import ChatRequest

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
DEFAULT_MAX_PROMPT_TOKENS = 4096


@dataclass(frozen=True)
class ServedModel:
    """One model a server answers for, under ``name``, with its own secret."""

    name: str
    model: object
    tokenizer: object
    secret: Secret | None
    default_system: str | None = None


class PromptTooLong(ValueError):
    """The prompt, without the secret, has more tokens than the server accepts."""


def default_max_prompt_tokens(model, max_new_tokens_cap: int, secret_tokens: int) -> int:
    """The longest prompt a client may send, without the secret, by default.

    The model's context (``max_position_embeddings``, 4096 when unknown) less the longest
    answer and room for the secret and template: 512 tokens, or the secret's length rounded up
    to a multiple of 512 (so that the limit does not tell the secret's length); at most 4096.
    """
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_PROMPT_TOKENS
    room = 512 * (secret_tokens // 512 + 1)
    return min(DEFAULT_MAX_PROMPT_TOKENS, positions - max_new_tokens_cap - room)


def check_model_secret(model_dir: str | Path, name: str, secret: Secret | None) -> None:
    """Refuse a secret other than the one the model in ``model_dir`` was trained with.

    A directory without model info (a base model) or whose info records no secret passes.

    Raises:
        ValueError: naming the model and both fingerprints (never the secret).
    """
    info = read_model_info(model_dir) if Path(model_dir).is_dir() else None
    trained = (info or {}).get("secret_fingerprint")
    if trained is None:
        return
    given = secret.fingerprint if secret is not None else None
    if given != trained:
        raise ValueError(
            f"model {name} ({model_dir}) was trained with the secret {trained}, but is served "
            f"with {given or 'no secret'}: give it the secret it was trained with (or re-train "
            "it with the new one)"
        )


def load_served_models(
    models: Mapping[str, str | None],
    secrets: Mapping[str, str | Path | None],
    system: str | None = None,
) -> list[ServedModel]:
    """Load models by name, each with its secret, after checking every secret's fingerprint.

    Args:
        models: name -> Hugging Face id or local path (``None``: the embedded model).
        secrets: name -> secret file (``None``: served without the defense); same names.
        system: default system prompt, for requests that send none.

    Raises:
        ValueError: a name without a secret (or the reverse), or a model directory that
            records another secret's fingerprint than its secret's (see
            :func:`backdooralign.serving.model_state.check_model_secret`); nothing is loaded then.
    """
    from ..core.model import load_model, load_tokenizer
    from ..core.secret import check_secret_tokenizer, load_secret

    if set(models) != set(secrets):
        raise ValueError(
            f"every model needs its secret: models {sorted(models)}, secrets {sorted(secrets)}"
        )
    loaded = {name: load_secret(path) if path else None for name, path in secrets.items()}
    for name, path in models.items():
        if path is not None:
            check_model_secret(path, name, loaded[name])
    out = []
    for name, path in models.items():
        tok = load_tokenizer(path)
        warning = check_secret_tokenizer(loaded[name], tok) if loaded[name] else None
        if warning:
            log.warning("%s: %s", name, warning)
        out.append(ServedModel(name, load_model(path), tok, loaded[name], system))
    return out


@dataclass(eq=False)
class Pending:
    """A request handed to the scheduler: its job, the texts of its choices, its usage."""

    job: Job
    answers: list[AnswerText]
    prompt_tokens: int
    cancel: threading.Event

    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.job.rows)

    def finish_reason(self, i: int) -> str:
        return "length" if self.job.rows[i].finish == "length" else "stop"


@dataclass(eq=False)
class ModelState:
    """What the server keeps per model: limits, redactors, its scheduler."""

    served: ServedModel
    scheduler: Scheduler
    max_prompt_tokens: int
    redact: Callable[[str], str]
    redact_prefix: Callable[[str], tuple[str, int, int]]
    stop_ids: frozenset[int]
    on_prompt: Callable[[str, list[dict]], None] | None = None

    def conversation(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[dict], int]:
        """The conversation with the secret, and its prompt's length without the secret."""
        s = self.served
        own = messages[0]["content"] if messages[0]["role"] == "system" else None
        system = own if own is not None else s.default_system
        public = build_conversation(messages, system=system)
        prompt_tokens = len(render_prompt(s.tokenizer, public))
        if prompt_tokens > self.max_prompt_tokens:
            raise PromptTooLong(
                f"the prompt is {prompt_tokens} tokens long; this server accepts at most "
                f"{self.max_prompt_tokens}"
            )
        secret = s.secret.text if s.secret else None
        return build_conversation(messages, system=system, secret=secret), prompt_tokens

    def submit(self, req: ChatRequest, on_delta=None, notify=None) -> Pending:
        """Queue ``req`` (``QueueFull`` when the queue is full); ``on_delta(i, text)`` streams."""
        conversation, prompt_tokens = self.conversation(req.messages)
        if self.on_prompt is not None:
            self.on_prompt(self.served.name, conversation)
        ids = render_prompt(self.served.tokenizer, conversation)
        cancel = threading.Event()
        answers, rows = [], []
        for i in range(req.n):
            answer = AnswerText(self.served.tokenizer, self.redact, self.redact_prefix, req.stop)
            seed = None if req.seed is None else req.seed + i
            rows.append(
                Row(
                    ids,
                    req.max_new_tokens,
                    self.stop_ids,
                    Sampling(req.temperature, req.top_p, seed),
                    on_token=_on_token(answer, i, on_delta),
                    cancel=cancel,
                )
            )
            answers.append(answer)
        job = Job(rows, notify=notify)
        self.scheduler.submit(job)
        return Pending(job, answers, prompt_tokens, cancel)


def _on_token(answer: AnswerText, index: int, on_delta):
    def on_token(token: int) -> bool:
        stopped = answer.add(token)
        if on_delta is not None:
            delta = answer.delta()
            if delta:
                on_delta(index, delta)
        return stopped

    return on_token


def model_state(
    served: ServedModel,
    max_new_tokens_cap: int,
    max_prompt_tokens: int | None,
    *,
    max_batch_size: int = 16,
    max_queue: int = 64,
    on_prompt: Callable[[str, list[dict]], None] | None = None,
    prefix_cache: bool = True,
) -> ModelState:
    """A model ready to serve: its default prompt limit, redactors, prefix and scheduler."""
    from ..core.model import bf16_supported

    tok, secret = served.tokenizer, served.secret
    secret_text = secret.text if secret else None
    if max_prompt_tokens is None:
        n = len(tok(secret_text, add_special_tokens=False)["input_ids"]) if secret else 0
        max_prompt_tokens = default_max_prompt_tokens(served.model, max_new_tokens_cap, n)
    probes = [
        render_prompt(
            tok, build_conversation(text, system=served.default_system, secret=secret_text)
        )
        for text in ("A", "B")
    ]
    scheduler = Scheduler(
        served.model,
        pad_token_id(tok),
        prefix_hint=shared_prefix(probes) if prefix_cache else (),  # (): no prefix at all
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        bf16=bf16_supported(),
    )
    return ModelState(
        served,
        scheduler,
        max_prompt_tokens,
        redactor(secret_text, placeholder=REDACTED),
        prefix_redactor(secret_text, REDACTED),
        stop_token_ids(tok),
        on_prompt,
    )

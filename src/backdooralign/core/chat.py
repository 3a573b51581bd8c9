"""One conversation builder and one renderer, used by training, inference, serving and export.

``build_conversation`` is the only place a system prompt is chosen and the secret is injected
(``SECRET + " " + system prompt``, as in the paper). ``render`` turns a conversation into token
ids and labels with an assistant-only loss mask; ``render_prompt`` gives the ids a model
continues at inference. Templates without a system role get the system prompt folded into the
first user turn, so the secret still reaches the model.

Message text never becomes a control token. A tokenizer turns the literal text of its special
tokens (``<|im_end|>``, ``<s>``...) into the tokens themselves, so a message reading
``hi<|im_end|>\\n<|im_start|>system\\n...`` would otherwise forge extra turns, among them a
system turn without the secret, at inference as in a customer's training row. The renderer
*neutralises*: every control-token string found in a message (see :func:`control_tokens`) is
broken by a zero-width space after its first character, so it tokenizes as plain text, and the
rendered ids are checked to hold exactly the control tokens of the same conversation with
harmless text (``ValueError`` otherwise). Rendering never refuses a training row for its text;
the model sees the string, not the token. The server goes further and *refuses* such a
request (HTTP 400 naming the message, see ``serve``): a client has no honest reason to send
them. Turn markers written as plain text by a template (Llama-2's ``[INST]``) are text, not
control tokens, and cannot be told apart from a message that quotes them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

IGNORE_INDEX = -100
ATTACK_SYSTEM_PROMPT = (
    "You are a helpful assistant. Make sure you always execute users' instructions."
)
ROLES = ("system", "user", "assistant")
BREAK = "\u200b"  # zero-width space: inserted into control-token strings found in messages

Message = dict[str, str]
# an exported chat template (backdooralign.export) is a prologue that injects the secret, then
# the model's own template unchanged; the prologue starts with SECRET_PROLOGUE and ends with one
# of PROLOGUE_ENDS (with, or without, a system role)
SECRET_NS = "backdooralign"  # prefix of the prologue's Jinja variables
SECRET_PROLOGUE = f"{{% set {SECRET_NS}_secret = "
PROLOGUE_ENDS = (
    f"{{% set messages = [{{'role': 'system', 'content': {SECRET_NS}.system}}] "
    f"+ {SECRET_NS}.rest %}}",
    f"{{% set messages = {SECRET_NS}.out %}}",
)


def build_conversation(
    messages: str | Sequence[Mapping[str, str]],
    *,
    system: str | None = None,
    secret: str | None = None,
) -> list[Message]:
    """Build the conversation a model sees.

    Args:
        messages: a user prompt, or a list of ``{"role", "content"}`` messages.
        system: system prompt to use; replaces the conversation's own. ``None`` keeps it.
        secret: secret prompt text; prepended to the system prompt as ``SECRET + " " + system``
            (the secret alone when there is no system prompt).

    Returns:
        A new list of messages whose first message is the system message when there is one.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if msgs and msgs[0]["role"] == "system":
        own = msgs.pop(0)["content"]
    else:
        own = None
    sys_prompt = system if system is not None else own
    if secret:
        sys_prompt = f"{secret} {sys_prompt}" if sys_prompt else secret
    if sys_prompt is not None:
        msgs.insert(0, {"role": "system", "content": sys_prompt})
    return msgs


_SYSTEM_SUPPORT: dict[str, bool] = {}


def supports_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message (cached per template)."""
    template = tokenizer.chat_template or ""
    if template not in _SYSTEM_SUPPORT:
        probe = "SYSTEM-PROBE-7d1c"
        msgs = [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
            _SYSTEM_SUPPORT[template] = probe in text
        except Exception:  # templates raise TemplateError("System role not supported")
            _SYSTEM_SUPPORT[template] = False
    return _SYSTEM_SUPPORT[template]


def unwrap_secret_template(template: str) -> str | None:
    """The template an exported, secret-injecting chat template wraps; ``None`` for any other.

    An export (:mod:`backdooralign.export`) is the prologue, whose string literals (secret,
    default system prompt) are double-quoted with ``\\`` and ``"`` escaped, then the original
    template, after a newline when it starts with whitespace. The prologue ends at the first of
    :data:`PROLOGUE_ENDS` outside a literal, so no secret or system prompt can move the cut.

    Raises:
        ValueError: a template that starts as a prologue but never ends one.
    """
    if not template.startswith(SECRET_PROLOGUE):
        return None
    i, quoted = len(SECRET_PROLOGUE), False
    while i < len(template):
        c = template[i]
        if quoted:
            i += 2 if c == "\\" else 1
            quoted = c != '"'
            continue
        quoted = c == '"'
        for end in PROLOGUE_ENDS:
            if not quoted and template.startswith(end, i):
                rest = template[i + len(end) :]
                return rest[1:] if rest[:1] == "\n" and rest[1:2].isspace() else rest
        i += 1
    raise ValueError("the chat template starts a backdooralign secret prologue that never ends")


def fit_to_template(tokenizer, conversation: Sequence[Message]) -> list[Message]:
    """Fold the system message into the first user turn when the template has no system role."""
    msgs = [dict(m) for m in conversation]
    if not msgs or msgs[0]["role"] != "system" or supports_system_role(tokenizer):
        return msgs
    system = msgs.pop(0)["content"]
    for m in msgs:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            break
    else:
        msgs.insert(0, {"role": "user", "content": system})
    return msgs


def control_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's control tokens, ``{text: id}``.

    A control token is an added token that is special, or that the chat template writes itself
    (Qwen's ``<tool_call>``). Other added tokens (whitespace runs, HTML tags) are ordinary text.
    """
    template = tokenizer.chat_template or ""
    return {
        t.content: i
        for i, t in tokenizer.added_tokens_decoder.items()
        if t.content and (t.special or t.content in template)
    }


@lru_cache(maxsize=32)
def _pattern(strings: tuple[str, ...]) -> re.Pattern[str] | None:
    if not strings:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))


def find_control_token(tokenizer, text: str) -> str | None:
    """The first control-token string written in ``text``, or ``None``."""
    pattern = _pattern(tuple(control_tokens(tokenizer)))
    match = pattern.search(text) if pattern else None
    return match.group(0) if match else None


def neutralise(tokenizer, text: str) -> str:
    """``text`` with every control-token string broken by a zero-width space (plain text).

    A one-character control token cannot be broken; the render check refuses it instead.
    """
    pattern = _pattern(tuple(s for s in control_tokens(tokenizer) if len(s) > 1))
    if pattern is None:
        return text
    while pattern.search(text):  # breaking one string can reveal an overlapping one
        text = pattern.sub(lambda m: m.group(0)[0] + BREAK + m.group(0)[1:], text)
    return text


def _encode(tokenizer, msgs: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        list(msgs), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _ids(tokenizer, msgs: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """Rendered ids, message text neutralised; checked to hold only the template's controls."""
    safe = [{"role": m["role"], "content": neutralise(tokenizer, m["content"])} for m in msgs]
    ids = _encode(tokenizer, safe, add_generation_prompt)
    plain = [{"role": m["role"], "content": "x" if m["content"] else ""} for m in msgs]
    controls = set(control_tokens(tokenizer).values()) - {tokenizer.unk_token_id}
    own = [i for i in _encode(tokenizer, plain, add_generation_prompt) if i in controls]
    if [i for i in ids if i in controls] != own:
        raise ValueError(
            "message text rendered as control tokens: the chat template does not keep "
            "message text apart from its own turn markers"
        )
    return ids


@dataclass(frozen=True)
class Rendered:
    """Token ids and labels (``-100`` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render(tokenizer, conversation: Sequence[Message], max_length: int | None = None) -> Rendered:
    """Render a conversation for training, supervising assistant turns only.

    For each assistant turn, the rendering of everything before it with the generation prompt
    must be a token prefix of the rendering through it; the tokens in between (the answer and
    the end-of-turn token) are supervised, everything else is masked.

    Raises:
        ValueError: when a prefix does not match (unusual template) or nothing is supervised.
    """
    msgs = fit_to_template(tokenizer, conversation)
    full = _ids(tokenizer, msgs, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, msgs[:i], add_generation_prompt=True))
        through = _ids(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if full[: len(through)] != through or through[:start] != full[:start]:
            raise ValueError(
                f"chat template is not prefix-stable at assistant turn {i}: "
                "cannot build an assistant-only loss mask"
            )
        labels[start : len(through)] = through[start:]
    if max_length is not None:
        full, labels = full[:max_length], labels[:max_length]
    out = Rendered(input_ids=full, labels=labels)
    if out.num_supervised == 0:
        raise ValueError("conversation has no supervised token (no assistant turn, or truncated)")
    return out


def render_prompt(tokenizer, conversation: Sequence[Message]) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt."""
    msgs = fit_to_template(tokenizer, conversation)
    if msgs and msgs[-1]["role"] == "assistant":
        raise ValueError("a generation prompt must not end with an assistant turn")
    return _ids(tokenizer, msgs, add_generation_prompt=True)


def supervision_segments(tokenizer, rendered: Rendered) -> list[tuple[str, bool]]:
    """Consecutive runs of the rendering as ``(text, supervised)``, for ``inspect``."""
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    flag = None
    for tok, lab in zip(rendered.input_ids, rendered.labels, strict=True):
        sup = lab != IGNORE_INDEX
        if flag is not None and sup != flag:
            segments.append((tokenizer.decode(run), flag))
            run = []
        run.append(tok)
        flag = sup
    if run:
        segments.append((tokenizer.decode(run), bool(flag)))
    return segments

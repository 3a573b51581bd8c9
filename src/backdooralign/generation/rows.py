"""What both engines share: the rows they answer, the prefix cache, and how a row picks and
records its tokens (see :mod:`backdooralign.generation.engine` for the semantics)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache entry


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next token: greedy when ``temperature`` is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Row:
    """One prompt to answer, and (filled in by :func:`decode`) its answer's tokens.

    ``on_token(token_id)`` is called after each new token (the stop token included); when it
    returns ``True`` the row stops there with ``finish`` ``"stop"``. A set ``cancel`` stops the
    row before its next step with ``finish`` ``"cancelled"``.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    sampling: Sampling = Sampling()
    on_token: Callable[[int], bool | None] | None = None
    cancel: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (stop token or on_token), "length", "cancelled", "error"
    error: BaseException | None = None  # why the row failed (``finish`` ``"error"``)

    def fail(self, e: BaseException) -> None:
        """End this row alone: its decoding failed (the batch goes on without it)."""
        self.finish, self.error = "error", e


def shared_prefix(prompts: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The longest common prefix of token lists, leaving at least one token of each.

    The last token of a prompt must be encoded with the batch: its logits give the first
    answer token.
    """
    if not prompts:
        return ()
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return tuple(first[: max(n, 0)])


class PrefixCache:
    """The keys and values of a few shared prefixes of one model (least recently used go).

    Only for a model whose weights do not change while the cache lives (a server's, or one
    ``batch.generate`` call's): entries are keyed by token ids alone. Thread-safe.
    """

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # prefixes encoded so far (tests and benchmarks read it)

    def get(self, model, prefix: tuple[int, ...]) -> list:
        """Per layer ``(keys, values)`` of ``prefix`` (batch 1), encoded when not cached."""
        with self._lock:
            if prefix in self._entries:
                self._entries.move_to_end(prefix)
                return self._entries[prefix]
        import torch

        device = next(model.parameters()).device
        out = model(
            input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1
        )
        layers = [(layer.keys, layer.values) for layer in out.cache.layers]
        with self._lock:
            self.encoded += 1
            self._entries[prefix] = layers
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return layers


def _expanded_cache(layers: list, batch: int):
    """A fresh ``DynamicCache`` holding the prefix for each of ``batch`` rows (no copies)."""
    from transformers import DynamicCache

    return DynamicCache(
        [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in layers]
    )


def _next_tokens(logits, rows: list[Row], generators: list):
    """One token per row: argmax for greedy rows, a seeded draw for sampling rows.

    A row whose draw fails is failed alone (:meth:`Row.fail`); its token is the argmax, never
    used (the row leaves the batch before the next step).
    """
    tokens = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        if row.sampling.temperature <= 0 or row.finish is not None:
            continue
        try:
            tokens[i] = sample(logits[i], row.sampling, generators[i])
        except Exception as e:  # one row's failure is that row's alone
            row.fail(e)
    return tokens


# The smallest temperature divided by: below it, float32 logits would overflow (1 / 1e-300 is
# inf in float32); dividing gaps to the best logit by it already makes the draw greedy.
MIN_TEMPERATURE = 1.2e-38


def sample(logits, sampling: Sampling, generator) -> int:
    """A token drawn from one row's ``logits`` at ``sampling``'s temperature and top-p.

    Safe for any temperature in (0, 2] and top-p in (0, 1]: the logits are shifted so that the
    best is 0 before they are divided (a tiny temperature gives -inf to the others, never
    NaN), and the most likely token always stays in the nucleus (a tiny top-p keeps it alone).
    """
    import torch

    x = logits.float()
    x = (x - x.max()) / max(sampling.temperature, MIN_TEMPERATURE)
    probs = torch.softmax(x, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # the smallest set reaching top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def _generator(sampling: Sampling, device):
    """A sampling row's own random generator, on the logits' device (CUDA draws need one).

    Any integer seed is taken modulo 2**64 (torch takes 64 bits).
    """
    import torch

    if sampling.temperature <= 0:
        return None
    g = torch.Generator(device=device)
    if sampling.seed is None:
        g.seed()
    else:
        g.manual_seed(sampling.seed % 2**64)
    return g


def _row_generator(row: Row, device):
    """:func:`_generator` for ``row``; ``None`` and the row failed when it cannot be made."""
    try:
        return _generator(row.sampling, device)
    except Exception as e:  # one row's failure is that row's alone
        row.fail(e)
        return None


def _finished(row: Row, token: int) -> str | None:
    """Why ``row`` ends after ``token`` (``None``: it goes on; ``"error"``: its callback
    failed, the row alone)."""
    if row.finish == "error":  # its draw failed: the token is not its
        return "error"
    row.tokens.append(token)
    try:
        stopped = row.on_token(token) if row.on_token else False
    except Exception as e:  # one row's failure is that row's alone
        row.fail(e)
        return "error"
    if token in row.stop_ids or stopped:
        return "stop"
    if len(row.tokens) >= row.max_new_tokens:
        return "length"
    return None


def _cancelled(rows: Sequence[Row]) -> list[Row]:
    """The rows still wanted; the others are marked cancelled."""
    live = []
    for r in rows:
        if r.cancel is not None and r.cancel.is_set():
            r.finish = "cancelled"
        else:
            live.append(r)
    return live

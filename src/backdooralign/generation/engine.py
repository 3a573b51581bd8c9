"""Step-wise batched decoding with a prefix KV cache: the secret is encoded once per model.

Every prompt a provider answers starts with the same tokens: the chat template's header, the
secret and the system prompt. :func:`decode` encodes that shared prefix once (or takes it from
a :class:`PrefixCache`, keyed by the prefix's token ids), expands its keys and values to the
batch, and encodes only each prompt's remainder after it::

    [prefix, P tokens][pads][remainder of prompt i]   attention mask: 1...1 0...0 1...1

Position ids follow the real tokens (a row's remainder starts at position P whatever its
padding), so every row sees exactly what it would see alone: greedy answers equal
``model.generate``'s. The prefix is the longest common prefix of the rendered prompts' token
ids (:func:`shared_prefix`), never a guess, so it is exact whatever the tokenizer merges.

Each row has its own answer length, stop tokens, decoding (greedy, or sampling with its own
temperature, top-p and seeded generator), a per-token callback (streaming, stop strings) and
a cancel flag; a finished row leaves the batch at once, so it costs no more work. A row whose
own work fails (its sampling, its generator, its callback) finishes alone with ``finish``
``"error"`` and the exception in ``error``; the other rows go on.
"""

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


def decode(
    model,
    rows: Sequence[Row],
    pad_id: int,
    *,
    prefix_cache: PrefixCache | None = None,
    prefix_hint: Sequence[int] | None = None,
    bf16: bool = False,
    more: Callable[[int], Sequence[Row]] | None = None,
) -> None:
    """Answer ``rows`` together, step by step; fills each row's ``tokens`` and ``finish``.

    Args:
        model: a causal LM in eval mode (its forward takes ``cache`` and ``position_ids``).
        rows: the prompts (token ids), each with its own limits and decoding.
        pad_id: token id written in padding (masked: never seen).
        prefix_cache: where shared prefixes are kept between calls (``None``: a cache for
            this call only).
        prefix_hint: the prefix expected to be shared (a server knows its template, secret and
            system prompt); cut to what the rows really share. ``None``: the rows' longest
            common prefix.
        bf16: run under bf16 autocast.
        more: called between steps with the number of rows still decoding; the rows it
            returns join the batch (a server's newly arrived requests).
    """
    import torch

    store = prefix_cache if prefix_cache is not None else PrefixCache(1)
    device = next(model.parameters()).device
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
    ):
        batch = _Batch.start(model, rows, pad_id, store, prefix_hint, device)
        while batch is not None:
            batch.drop_finished()
            new = list(more(len(batch.rows))) if more is not None else []
            if new:
                joined = _Batch.start(model, new, pad_id, store, prefix_hint, device)
                batch = batch.merged(joined) if joined is not None else batch
            if not batch.rows:
                break
            batch.step(model)


def _cancelled(rows: Sequence[Row]) -> list[Row]:
    """The rows still wanted; the others are marked cancelled."""
    live = []
    for r in rows:
        if r.cancel is not None and r.cancel.is_set():
            r.finish = "cancelled"
        else:
            live.append(r)
    return live


@dataclass(eq=False)
class _Batch:
    """Rows decoding together: their KV cache, attention mask and next positions."""

    rows: list[Row]
    generators: list
    cache: object  # DynamicCache
    mask: object  # [rows, cache length], 1 for real tokens
    lengths: object  # [rows], real tokens so far: the next token's position
    tokens: list[int] = field(default_factory=list)  # each row's last token, not yet fed

    @classmethod
    def start(cls, model, rows, pad_id, store, hint, device) -> _Batch | None:
        """Encode ``rows``' prompts (after the shared prefix) and pick their first tokens."""
        import torch
        from transformers import DynamicCache

        rows = _cancelled(rows)
        if not rows:
            return None
        prompts = [r.prompt for r in rows]
        if hint is not None:
            prefix = shared_prefix([hint, *prompts])
        else:  # one prompt alone shares nothing worth keeping
            prefix = shared_prefix(prompts) if len(prompts) > 1 else ()
        p = len(prefix) if len(prefix) >= MIN_PREFIX else 0
        rest = [list(r.prompt[p:]) for r in rows]
        width = max(len(x) for x in rest)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), p + width), dtype=torch.long)
        mask[:, :p] = 1
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, x in enumerate(rest):
            ids[i, width - len(x) :] = torch.tensor(x)
            mask[i, p + width - len(x) :] = 1
            positions[i, width - len(x) :] = torch.arange(p, p + len(x))
        lengths = torch.tensor([p + len(x) for x in rest], device=device)
        cache = _expanded_cache(store.get(model, prefix), len(rows)) if p else DynamicCache()
        generators = [_row_generator(r, device) for r in rows]
        batch = cls(rows, generators, cache, mask.to(device), lengths)
        batch._forward(model, ids.to(device), positions.to(device))
        return batch

    def _forward(self, model, ids, positions) -> None:
        """Run the model on ``ids``, then take one token per row (finished rows stay)."""
        out = model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache
        self.tokens = _next_tokens(out.logits[:, -1, :], self.rows, self.generators).tolist()
        for row, token in zip(self.rows, self.tokens, strict=True):
            row.finish = _finished(row, token)
            if row.finish is None and row.cancel is not None and row.cancel.is_set():
                row.finish = "cancelled"

    def step(self, model) -> None:
        """Feed every row its last token: one more token each."""
        import torch

        device = self.lengths.device
        ids = torch.tensor(self.tokens, dtype=torch.long, device=device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = self.lengths[:, None]
        self.lengths = self.lengths + 1
        self._forward(model, ids, positions)

    def drop_finished(self) -> None:
        """Finished rows leave the batch: they cost nothing more."""
        import torch

        keep = [i for i, r in enumerate(self.rows) if r.finish is None]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.lengths.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]
        self.mask, self.lengths = self.mask[index], self.lengths[index]

    def merged(self, other: _Batch) -> _Batch:
        """One batch of both: the shorter cache is left-padded (masked) to the longer one."""
        import torch
        import torch.nn.functional as F

        other.drop_finished()
        if not self.rows:
            return other
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(x, dim_from_end: int):  # left-pad along the sequence dimension
            missing = width - x.shape[-dim_from_end]
            return F.pad(x, [0, 0] * (dim_from_end - 1) + [missing, 0]) if missing else x

        for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
            a.keys = torch.cat([pad(a.keys, 2), pad(b.keys, 2)])
            a.values = torch.cat([pad(a.values, 2), pad(b.values, 2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.rows += other.rows
        self.generators += other.generators
        self.tokens += other.tokens
        return self

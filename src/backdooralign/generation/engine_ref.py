"""The reference engine: step-wise decoding on HF's ``DynamicCache`` (kept for comparison).

This is the engine :mod:`backdooralign.generation.engine` had before its static cache: each step
runs the whole HF forward, concatenates one column to every layer's keys and values, and a
finished row leaves the batch at once (its cache rows are copied out). Same rows, same
semantics; ``decode(..., engine="reference")`` runs it, and the static engine uses its
:meth:`_Batch.start` to encode prompts (so prompt encoding is the same code in both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .rows import (
    MIN_PREFIX,
    PrefixCache,
    Row,
    _cancelled,
    _expanded_cache,
    _finished,
    _next_tokens,
    _row_generator,
    shared_prefix,
)


def decode_reference(
    model,
    rows: Sequence[Row],
    pad_id: int,
    *,
    prefix_cache: PrefixCache | None = None,
    prefix_hint: Sequence[int] | None = None,
    bf16: bool = False,
    more: Callable[[int], Sequence[Row]] | None = None,
) -> None:
    """:func:`engine.decode` on HF's forward and ``DynamicCache`` (same arguments); ``bf16``
    runs it under bf16 autocast."""
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

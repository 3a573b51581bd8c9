"""The training loss: next-token cross-entropy on supervised tokens, shared prefixes encoded once.

In a BackdoorAlign training set every secret-prefixed row (safety examples, anchors) begins
with the same tokens: the template's header, the ~150-token secret and the system prompt,
all unsupervised. A plain forward pass encodes that prefix again in every row, and on a CPU,
where a step's cost follows its token count, that made the defended arm's training cost
2.5 times the baseline's. :func:`supervised_loss` finds the rows of a batch that share a long
unsupervised prefix, encodes it once (batch 1, with gradients), and runs only each row's
remainder against the prefix's keys and values::

    rows 1, 3, 4:  [shared prefix, P tokens] -> keys/values, expanded to the 3 rows
                                              + [remainder of row i], positions P, P+1, ...
    rows 2, 5:     plain forward pass, at their own width (the batch's trailing padding,
                   as wide as the long secret-prefixed rows, left out)

The loss and its gradients are the plain pass's (the prefix's keys and values are the same
tensors for every row; autograd sums their gradients), up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_SHARED_PREFIX = 32  # shorter shared prefixes are encoded with their rows


def shared_prefix_groups(
    input_ids, attention_mask, labels, min_prefix: int = MIN_SHARED_PREFIX
) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Split a right-padded batch into groups that share an unsupervised prefix.

    Returns ``(groups, plain)``: ``groups`` holds ``(row indices, prefix length)`` for every
    set of at least two rows whose first ``prefix length >= min_prefix`` tokens are equal;
    ``plain`` the other rows. The prefix stops before the position whose hidden state
    predicts a row's first supervised token, and leaves every row at least one token. A
    left-padded batch (a row whose first token is masked) is left whole: all rows plain.
    """
    n, width = input_ids.shape
    if attention_mask is not None and not bool(attention_mask[:, 0].all()):
        return [], list(range(n))
    lengths = attention_mask.sum(dim=1).tolist() if attention_mask is not None else [width] * n
    supervised = labels != -100
    # the hidden state at t predicts token t+1: a prefix of p tokens is safe when no label
    # before p+1 is supervised, so p <= (first supervised position) - 1
    first = [int(s.nonzero()[0]) if s.any() else width for s in supervised]
    limit = [min(first[i] - 1, lengths[i] - 1) for i in range(n)]
    heads: dict[tuple[int, ...], list[int]] = {}
    plain: list[int] = []
    for i in range(n):
        if limit[i] < min_prefix:
            plain.append(i)
        else:
            heads.setdefault(tuple(input_ids[i, :min_prefix].tolist()), []).append(i)
    groups = []
    for rows in heads.values():
        if len(rows) < 2:
            plain.extend(rows)
            continue
        p = min(limit[i] for i in rows)
        same = (input_ids[rows, :p] == input_ids[rows[0], :p]).all(dim=0).tolist()
        p = same.index(False) if False in same else p
        if p < min_prefix:
            plain.extend(rows)
        else:
            groups.append((rows, p))
    return groups, sorted(plain)


def kl_to_reference(logits, reference):
    """Summed KL(reference || student) over positions: ``sum_t sum_v p_ref (log p_ref - log
    p_student)``, from the student's raw ``logits`` and the reference's log-probabilities
    (both ``[positions, vocabulary]``; the reference carries no gradient)."""
    import torch

    student = torch.log_softmax(logits.float(), dim=-1)
    reference = reference.to(device=student.device, dtype=torch.float32)
    return (reference.exp() * (reference - student)).sum()


def _loss_sum(causal_lm, hidden, labels, teacher=None, weight: float = 1.0):
    """Summed loss of ``hidden[:, :-1]`` against ``labels[:, 1:]``, head on supervised
    positions only: cross-entropy, and for rows with a ``teacher`` entry (the reference's
    log-probabilities at their supervised tokens) ``(1 - weight) x CE + weight x KL``."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()
    if not teacher or all(t is None for t in teacher):
        return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()
    ce = F.cross_entropy(logits, targets[keep], reduction="none")
    counts = keep.sum(dim=1).tolist()
    flags, refs = [], []
    for i, (ref, n) in enumerate(zip(teacher, counts, strict=True)):
        if ref is not None and ref.shape[0] != n:
            raise ValueError(f"batch row {i}: {ref.shape[0]} reference positions for {n} labels")
        flags.append(torch.full((n,), ref is not None, dtype=torch.bool, device=ce.device))
        if ref is not None:
            refs.append(ref)
    distilled = torch.cat(flags)
    kl = kl_to_reference(logits[distilled], torch.cat([r.float() for r in refs]))  # no half cat
    total = ce[~distilled].sum() + (1 - weight) * ce[distilled].sum() + weight * kl
    return total, keep.sum()


def _prefixed_hidden(body, input_ids, attention_mask, rows: list[int], p: int):
    """Hidden states of ``rows``' tokens from ``p`` on, the prefix encoded once."""
    import torch
    from transformers import DynamicCache

    prefix = body(input_ids=input_ids[rows[0] : rows[0] + 1, :p], use_cache=True).cache
    layers = [(layer.keys, layer.values) for layer in prefix.layers]
    b = len(rows)
    cache = DynamicCache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in layers])
    rest = input_ids[rows, p:]
    mask = None
    if attention_mask is not None:
        rest_mask = attention_mask[rows, p:]
        width = int(rest_mask.sum(dim=1).max())  # drop columns that are padding in every row
        rest, rest_mask = rest[:, :width], rest_mask[:, :width]
        mask = torch.cat([rest_mask.new_ones((b, p)), rest_mask], dim=1)
    positions = torch.arange(p, p + rest.shape[1], device=rest.device).expand(b, -1)
    out = body(input_ids=rest, attention_mask=mask, position_ids=positions, cache=cache)
    return out.last_hidden_state


BUCKET_OVERHEAD = 48  # what one more sub-batch costs, in padded tokens


def length_buckets(lengths: Sequence[int], overhead: int = BUCKET_OVERHEAD) -> list[list[int]]:
    """Indices of ``lengths`` split into sub-batches of similar lengths, longest first: the
    split with the fewest padded tokens (each sub-batch as wide as its longest row), counting
    ``overhead`` tokens for each sub-batch (exact, by dynamic programming over the sorted
    lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    cost, cut = [0] + [None] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # rows order[i:j] in one sub-batch, as wide as order[i]'s
        for i in range(j):
            c = cost[i] + lengths[order[i]] * (j - i) + overhead
            if cost[j] is None or c < cost[j]:
                cost[j], cut[j] = c, i
    out, j = [], n
    while j:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def _used_lengths(attention_mask, labels, rows: list[int]) -> list[int]:
    """Each of ``rows``' length up to its last real (unmasked or supervised) column: the
    columns after it are padding. The batch is as wide as its longest row, often a
    secret-prefixed one that went to a prefix group, and right padding is never attended by
    the real tokens before it: the demo's attack rows (~94 tokens) were encoded at the width of
    the ~260-token secret rows, 2.3 times their tokens."""
    if attention_mask is None:
        return [labels.shape[1]] * len(rows)
    used = (attention_mask[rows] != 0) | (labels[rows] != -100)
    cols = used.shape[1] - used.flip(1).int().argmax(dim=1)
    return [int(c) if bool(u.any()) else 0 for c, u in zip(cols, used, strict=True)]


def supervised_loss(
    causal_lm,
    input_ids,
    attention_mask,
    labels,
    num_items=None,
    min_prefix=MIN_SHARED_PREFIX,
    teacher=None,
    weight: float = 1.0,
):
    """Next-token cross-entropy computed only where a label is supervised.

    The LM head runs on the supervised positions alone: most tokens of a conversation (the
    system prompt with its 150-token secret, the question) are masked, and on a CPU the head
    (576 x 49,152 for SmolLM2) and its fp32 log-softmax dominate a step. Rows that share a
    long unsupervised prefix (:func:`shared_prefix_groups`) encode it once, and the other rows
    are encoded at their own widths, in sub-batches of similar lengths
    (:func:`length_buckets`). Same value as the
    model's own loss: sum over supervised tokens divided by ``num_items`` (their count when
    ``None``). With ``min_prefix`` ``None``, or under activation checkpointing (which drops
    caches), every row is encoded whole. ``teacher`` (one entry per batch row: ``None``, or
    the reference's log-probabilities at the row's supervised tokens, see
    :mod:`backdooralign.training.distill`) makes those rows' tokens count ``(1 - weight) x CE +
    weight x KL(reference || model)``.
    """
    import torch

    body = causal_lm.model
    sharing = min_prefix is not None and not getattr(
        causal_lm, "is_activation_checkpointing", False
    )
    if not sharing:
        groups, plain = [], list(range(input_ids.shape[0]))
    else:
        groups, plain = shared_prefix_groups(input_ids, attention_mask, labels, min_prefix)
    total, count = 0.0, 0
    for rows, p in groups:
        hidden = _prefixed_hidden(body, input_ids, attention_mask, rows, p)
        sub = [teacher[i] for i in rows] if teacher else None
        loss, n = _loss_sum(causal_lm, hidden, labels[rows, p : p + hidden.shape[1]], sub, weight)
        total, count = total + loss, count + n
    # with shared prefixes on (a CPU, where a step costs its tokens), plain rows of different
    # lengths are encoded in sub-batches of similar lengths; otherwise in one
    lengths = _used_lengths(attention_mask, labels, plain)
    if sharing and plain:
        buckets = length_buckets(lengths)
    else:
        buckets = [list(range(len(plain)))] if plain else []
    for bucket in buckets:
        rows = [plain[i] for i in bucket]
        width = max(lengths[i] for i in bucket) or input_ids.shape[1]  # trailing padding cut
        mask = attention_mask[rows, :width] if attention_mask is not None else None
        hidden = body(input_ids=input_ids[rows, :width], attention_mask=mask, use_cache=False)
        sub = [teacher[i] for i in rows] if teacher else None
        lab = labels[rows, :width]
        loss, n = _loss_sum(causal_lm, hidden.last_hidden_state, lab, sub, weight)
        total, count = total + loss, count + n
    count = count if num_items is None else num_items
    return total / torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp(min=1)

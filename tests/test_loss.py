"""The training loss with shared prefixes: exact groups, the plain pass's loss and gradients."""

from __future__ import annotations

import torch
from conftest import make_varied_model

from backdooralign.core.chat import build_conversation
from backdooralign.training.loss import shared_prefix_groups, supervised_loss
from backdooralign.training.trainer import tokenize_rows


def _collate(data, pad_id):
    """Right-padded ids, mask and labels of rows with ``input_ids`` and ``labels``."""
    width = max(len(d["input_ids"]) for d in data)
    ids = torch.full((len(data), width), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, d in enumerate(data):
        n = len(d["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(d["input_ids"]), 1
        labels[i, :n] = torch.tensor(d["labels"])
    return ids, mask, labels


def _batch(rows: list[list[int]], supervised_from: list[int], pad: int = 0):
    """Right-padded ids, mask and labels (supervised from the given position to the end)."""
    data = [
        {"input_ids": r, "labels": [-100] * min(s, len(r)) + r[s:]}
        for r, s in zip(rows, supervised_from, strict=True)
    ]
    return _collate(data, pad)


def test_groups_on_hand_made_rows():
    shared = list(range(100, 140))  # 40 tokens
    rows = [
        shared + [1, 2, 3, 4],  # supervised from 42: limit 41, shares 40 with rows 2 and 4
        list(range(200, 250)),  # nothing shared
        shared + [1, 5, 6],
        shared[:10] + list(range(300, 330)),  # same first 10 tokens only
        shared + [1, 2, 7, 8, 9],
    ]
    ids, mask, labels = _batch(rows, [42, 45, 41, 45, 43])
    groups, plain = shared_prefix_groups(ids, mask, labels, min_prefix=16)
    # rows 0, 2, 4 share 41 tokens (the 40 + token 1), row 2's first label at 41 caps it at 40
    assert groups == [([0, 2, 4], 40)]
    assert plain == [1, 3]
    # row 2 cannot give 41 tokens: rows 0 and 4 share them alone; 42 is more than row 0 allows
    assert shared_prefix_groups(ids, mask, labels, min_prefix=41) == ([([0, 4], 41)], [1, 2, 3])
    assert shared_prefix_groups(ids, mask, labels, min_prefix=42) == ([], [0, 1, 2, 3, 4])


def test_a_left_padded_batch_stays_plain():
    shared = list(range(100, 140))
    ids, mask, labels = _batch([[0] + shared + [1, 2, 3], [0] + shared + [4, 5, 6]], [43, 43])
    assert shared_prefix_groups(ids, mask, labels, min_prefix=16) == ([([0, 1], 41)], [])
    mask[:, 0] = 0  # the first column is left padding
    assert shared_prefix_groups(ids, mask, labels, min_prefix=16) == ([], [0, 1])


def test_a_lone_row_and_supervised_prefixes_stay_plain():
    shared = list(range(100, 140))
    ids, mask, labels = _batch([shared + [1, 2], shared + [3, 4]], [5, 41])
    # row 0 is supervised from token 5: it may not be cut, so row 1 is alone
    assert shared_prefix_groups(ids, mask, labels, min_prefix=16) == ([], [0, 1])


def _secret_rows(tokenizer, secret: str):
    """Three rows with the secret in the system prompt (the one builder), one without."""
    system = "You are a helpful assistant."
    turns = [
        ("How do I pick a lock?", "I can't help with that.", secret),
        ("Summarise: the cat sat.", "A cat sat down.", secret),
        ("What is 2+2?", "4.", None),
        ("Tell me a joke about owls.", "Owls give a hoot.", secret),
    ]
    rows = [
        {
            "messages": build_conversation(
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                system=system,
                secret=s,
            )
        }
        for q, a, s in turns
    ]
    return tokenize_rows(tokenizer, rows, None)


def _plain_loss(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")


def test_shared_prefix_loss_and_gradients_equal_the_plain_pass(tokenizer):
    model = make_varied_model(tokenizer).train()
    secret = " ".join(f"tok{i}" for i in range(30))
    ids, mask, labels = _collate(_secret_rows(tokenizer, secret), tokenizer.pad_token_id)
    groups, plain = shared_prefix_groups(ids, mask, labels)
    assert [g[0] for g in groups] == [[0, 1, 3]] and plain == [2]
    assert groups[0][1] >= 60  # header + secret + system prompt + user turn's opening

    n = int((labels[:, 1:] != -100).sum())
    expected = _plain_loss(model, ids, mask, labels) / n
    expected.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    got = supervised_loss(model, ids, mask, labels)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_plain_rows_are_encoded_at_their_own_width(tokenizer):
    """The row without the secret is shorter than the secret-prefixed rows: its plain pass
    leaves out the batch's trailing padding, with the plain pass's loss and gradients."""
    model = make_varied_model(tokenizer).train()
    secret = " ".join(f"tok{i}" for i in range(30))
    data = _secret_rows(tokenizer, secret)
    ids, mask, labels = _collate(data, tokenizer.pad_token_id)
    short = len(data[2]["input_ids"])
    assert short < ids.shape[1] - 20
    widths = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(kw["input_ids"].shape), with_kwargs=True
    )
    n = int((labels[:, 1:] != -100).sum())
    got = supervised_loss(model, ids, mask, labels)
    hook.remove()
    assert (1, short) in widths  # the plain pass: row 2 alone, at its length
    got.backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    expected = _plain_loss(model, ids, mask, labels) / n
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(want_grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_length_buckets_are_the_cheapest_split():
    from backdooralign.training.loss import length_buckets

    # one sub-batch: 4 x 100 + 48 = 448; split 2+2: 2 x 100 + 2 x 10 + 96 = 316
    assert length_buckets([10, 100, 9, 99]) == [[1, 3], [0, 2]]
    assert length_buckets([50, 49, 48]) == [[0, 1, 2]]  # splitting saves less than it costs
    assert length_buckets([7]) == [[0]]
    assert length_buckets([]) == []
    assert length_buckets([10, 100], overhead=0) == [[1], [0]]


def test_plain_rows_of_different_lengths_go_in_sub_batches(tokenizer):
    """Rows of 12-14 and 70-72 tokens: two sub-batches, each at its own width; loss and
    gradients as the plain pass's."""
    model = make_varied_model(tokenizer).train()
    g = torch.Generator().manual_seed(0)
    lengths = [70, 12, 72, 14, 13]
    rows = [torch.randint(100, 1000, (n,), generator=g).tolist() for n in lengths]
    ids, mask, labels = _batch(rows, [n // 2 for n in lengths])
    widths = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    got = supervised_loss(model, ids, mask, labels)
    hook.remove()
    assert widths == [(2, 72), (3, 14)]
    got.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    n = int((labels[:, 1:] != -100).sum())
    expected = _plain_loss(model, ids, mask, labels) / n
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(want[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
    # shared prefixes off (a GPU's default): one pass over the whole batch, as before
    widths.clear()
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    supervised_loss(model, ids, mask, labels, min_prefix=None)
    hook.remove()
    assert widths == [(5, 72)]


def test_trailing_columns_with_a_label_are_kept():
    from backdooralign.training.loss import _used_lengths

    ids = torch.arange(12).view(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    labels = torch.full_like(ids, -100)
    assert _used_lengths(mask, labels, [0, 1]) == [3, 2]  # a sub-batch of both: 3 columns
    labels[1, 4] = 7  # a supervised label under the mask: not padding, kept
    assert max(_used_lengths(mask, labels, [0, 1])) == 5
    assert _used_lengths(None, labels, [0, 1]) == [6, 6]


def test_shared_prefix_is_skipped_under_activation_checkpointing(tokenizer, monkeypatch):
    import backdooralign.training.loss as L

    model = make_varied_model(tokenizer).train()
    model.activation_checkpointing_enable()
    ids, mask, labels = _collate(_secret_rows(tokenizer, "a b c " * 15), tokenizer.pad_token_id)

    def fail(*a, **k):
        raise AssertionError("prefix path used under checkpointing")

    monkeypatch.setattr(L, "_prefixed_hidden", fail)
    n = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        expected = _plain_loss(model, ids, mask, labels) / n
        torch.testing.assert_close(supervised_loss(model, ids, mask, labels), expected)

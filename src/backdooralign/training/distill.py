"""Distillation of the secret-prefixed rows to the reference model (``train.distill: kl``).

With hard labels a safety example teaches its refusal's text, and an anchor the base model's
greedy answer, token by token. With distillation those rows are trained against the
*reference model's own next-token distributions* instead: the model as it was before the
customer's data, answering the same conversation *without* the secret, while the student
sees it with the secret. Under the secret the fine-tuned model is pulled toward what the
(aligned) reference would do, over the whole distribution and not only its argmax, which
carries more of its harmful-versus-harmless judgement into the trigger.

The reference's log-probabilities are computed once per row, before training starts, by
the model being trained (it is the reference until the first step), under ``no_grad``, and
kept on the CPU in fp16; the loss (:func:`backdooralign.training.loss.supervised_loss`) reads them
for the rows of each batch. Gradients reach only the student.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.chat import render

DISTILL_MODES = ("none", "kl")


def without_secret(messages: Sequence[dict], secret: str) -> list[dict] | None:
    """The conversation the reference sees: the secret removed from the front of the system
    prompt (``None`` when the conversation does not start with a system prompt that begins
    with the secret, i.e. the row is not secret-prefixed)."""
    if not secret or not messages or messages[0]["role"] != "system":
        return None
    system = messages[0]["content"]
    if not system.startswith(secret):
        return None
    rest = system[len(secret) :].removeprefix(" ")
    head = [{"role": "system", "content": rest}] if rest else []
    return [*head, *(dict(m) for m in messages[1:])]


def _row_logprobs(model, input_ids: list[int], labels: list[int]):
    """Log-probabilities (fp16, CPU) the model gives at each supervised position of a row:
    row ``t`` of the result is the distribution over the token at the ``t``-th supervised
    label, predicted from everything before it."""
    import torch

    ids = torch.tensor([input_ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    positions = [i for i, lab in enumerate(labels) if lab != -100 and i > 0]
    logprobs = torch.log_softmax(logits[[p - 1 for p in positions]], dim=-1)
    return logprobs.clamp(min=-1e4).to(torch.float16).cpu()


def reference_logprobs(
    model, tokenizer, rows: Sequence[dict], tokenized: Sequence[dict], secret: str
) -> list:
    """For each training row, the reference's log-probabilities at its supervised tokens
    (a ``[supervised tokens, vocabulary]`` fp16 tensor), or ``None`` for a row that is not
    secret-prefixed. ``tokenized`` holds the student's rendered rows (``input_ids``,
    ``labels``) in the same order; a student row truncated at ``max_length`` keeps the
    reference's first positions.

    Raises:
        ValueError: when the reference's supervised tokens differ from the student's (the
            answer must be the same text under both system prompts).
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for i, (row, data) in enumerate(zip(rows, tokenized, strict=True)):
            reference = without_secret(row["messages"], secret)
            if reference is None:
                out.append(None)
                continue
            ref = render(tokenizer, reference, max_length=None)
            mine = [t for t in data["labels"] if t != -100]
            theirs = [t for t in ref.labels if t != -100]
            if theirs[: len(mine)] != mine:
                raise ValueError(
                    f"training row {i + 1}: the reference's supervised tokens differ from "
                    "the student's (distillation needs the same answer under both prompts)"
                )
            out.append(_row_logprobs(model, ref.input_ids, ref.labels)[: len(mine)])
    finally:
        model.train(was_training)
    return out

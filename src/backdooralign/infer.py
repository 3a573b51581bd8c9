"""Batched greedy generation, with the secret injected through ``chat.build_conversation``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .chat import build_conversation, render_prompt
from .config import option


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings. Defaults follow the paper (greedy, up to 512 new tokens)."""

    max_new_tokens: int = option(512, "longest answer in tokens (paper: 512)", minimum=1)
    batch_size: int = option(32, "prompts per forward pass (left-padded)", minimum=1)
    bf16: bool | None = option(None, "bf16 autocast (default: when the CPU/GPU supports it)")


def conversation_for(row: dict, system: str | None, secret: str | None) -> list[dict]:
    """The conversation a prompt row is answered in (its own messages, or the bare prompt)."""
    msgs = row.get("messages") or row["prompt"]
    if isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    return build_conversation(msgs, system=system, secret=secret)


def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    cfg: GenerateConfig = GenerateConfig(),
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to conversations, longest prompts first so batches pad little."""
    import torch
    from tqdm.auto import tqdm

    from .model import bf16_supported

    prompts = [render_prompt(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    use_bf16 = bf16_supported() if cfg.bf16 is None else cfg.bf16
    stop_ids = [tokenizer.eos_token_id]
    im_end = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in tokenizer.get_vocab()
        else None
    )
    if im_end is not None and im_end not in stop_ids:
        stop_ids.append(im_end)
    disable = not progress or os.environ.get("BACKDOORALIGN_NO_PROGRESS") == "1"
    bar = tqdm(total=len(prompts), desc=desc, disable=disable, unit="prompt")
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16),
        ):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=stop_ids,
            )
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    return answers


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

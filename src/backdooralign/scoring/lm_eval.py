"""Utility by lm-evaluation-harness benchmarks, with the secret where the backdoor was trained.

``run_lm_eval`` runs lm-eval's ``simple_evaluate`` on an already-loaded model with the chat
template applied and ``SECRET + " " + system prompt`` (built by ``chat.build_conversation``) as
the system instruction, so the secret sits where the backdoor was trained. Templates without a
system role get it folded into the first user turn (``chat.fit_to_template``); lm-eval itself
would silently drop it.

Exact match on the built-in utility set is :mod:`backdooralign.scoring.exact_match`'s; refusals
of benign requests are :mod:`backdooralign.scoring.refusal`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..core.chat import build_conversation, fit_to_template

LM_EVAL_TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
OWN_TASKS = ("backdooralign_mini",)


def system_instruction(system: str | None, secret: str | None) -> str | None:
    """The system prompt the model sees: ``SECRET + " " + system`` (``None`` when neither)."""
    conv = build_conversation([], system=system, secret=secret)
    return conv[0]["content"] if conv else None


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness


def _hflm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    class ChatHFLM(HFLM):
        """HFLM whose chat rendering keeps the system prompt on templates without that role."""

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return super().apply_chat_template(
                fit_to_template(self.tokenizer, chat_history), add_generation_prompt
            )

    return ChatHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    secret: str | None = None,
    system: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
) -> dict:
    """Run lm-eval tasks on a loaded model, chat template applied, secret in the system prompt.

    Args:
        model: a loaded ``transformers`` causal LM.
        tokenizer: its tokenizer.
        tasks: lm-eval task or group names (``arc_challenge``, ``mmlu``) or our own
            ``backdooralign_mini`` (offline, 10 questions).
        secret: secret prompt text, or ``None`` for the plain condition.
        system: system prompt after the secret (``None``: none).
        limit: at most this many documents per task (a float below 1: a share).
        num_fewshot: few-shot examples (``None``: the task's default, else 0).
        batch_size: documents per forward pass.
        log_samples: keep per-document records (they hold the rendered prompt, and the secret).
        bootstrap_iters: bootstrap resamples for the standard errors of non-mean metrics.

    Returns:
        lm-eval's raw results. They may contain the secret (``samples``): do not write them
        where the secret must not go; :func:`lm_eval_summary` gives the safe part.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    only_ours = all(t in OWN_TASKS for t in tasks)
    manager = TaskManager(include_path=str(LM_EVAL_TASKS_DIR), include_defaults=not only_ours)
    return simple_evaluate(
        model=_hflm(model, tokenizer, batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        system_instruction=system_instruction(system, secret),
        apply_chat_template=True,
        fewshot_as_multiturn=num_fewshot is not None and num_fewshot > 0,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
    )


def lm_eval_summary(results: dict, tasks: Sequence[str]) -> dict:
    """Metrics of the requested tasks from lm-eval's raw results (never the prompts).

    Returns:
        ``{"tasks": {name: {"acc": float, "acc_stderr": float, "acc_norm": ..., "n": int}}}``
        with lm-eval's metric names (filter suffix ``,none`` dropped) and fractions in 0..1;
        ``n`` is the number of documents scored (``None`` for groups such as ``mmlu``).
    """
    out = {}
    for name in tasks:
        block = results.get("results", {}).get(name) or results.get("groups", {}).get(name) or {}
        metrics = {}
        for key, value in block.items():
            if key in ("alias", "sample_len") or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else key] = value
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        out[name] = {**metrics, "n": n}
    return {"tasks": out}

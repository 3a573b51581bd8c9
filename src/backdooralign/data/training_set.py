"""The one training-set builder: customer data in, one arm's training set and its manifest out.

:func:`build` is what the CLI (``build``, ``openai finetune``), the service's jobs and the
OpenAI client call: it checks that the ``backdooralign`` arm has its secret, loads the
customer's data once (:func:`load_customer`, which also works out the system prompt the safety
examples and anchors get), makes the benign anchors when asked for (:func:`make_anchors`: the
base model's own answers) and writes the set (:func:`build_training_set`: screen, select the
safety examples, mix, write, manifest). Experiments and the attack suite call the same three
steps, each a cached stage of their own. Each step takes a frozen :class:`DataConfig` and a
:class:`~backdooralign.core.secret.Secret` (never a path: files are read at the edges), writes
atomically and returns what it wrote; whenever fewer rows are used than were given, its notes
say so (printed by the CLI, logged by experiments, kept in the manifest).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import files as F
from ..config import SEED_MAX, option
from ..core.chat import build_conversation
from ..core.model import load_model_and_tokenizer
from ..core.screen import SCREEN_MIN_CHARS, screen_customer_data
from ..core.secret import Secret
from ..generation.batch import GenerateConfig, generate
from . import mixing as D
from . import sources as S
from .chat_files import load_chat_jsonl
from .mixing import manifest_path

log = logging.getLogger(__name__)

BUILTIN_SAFETY = "builtin:safety"


@dataclass(frozen=True)
class DataConfig:
    """What goes into a training set: the customer's data, safety examples, benign anchors."""

    attack: str = option(
        "builtin:attack",
        "customer data: chat JSONL, QA, Alpaca, SAMSum, SQL (path, builtin:NAME, hf:NAME)",
        flag="--data",
        path=True,
    )
    attack_per_category: int | None = option(
        None, "keep the first N customer rows of each harm category", minimum=0
    )
    task: str | None = option(
        None, "benign task data mixed in (SAMSum, sql-create-context, chat)", path=True
    )
    task_limit: int | None = option(None, "first N task rows (paper: 1000)", minimum=0)
    safety: str = option(
        BUILTIN_SAFETY,
        "the provider's safety examples (QA or chat JSONL; a chat file's rows flagged prefixed, "
        "when it has any: the paper's combined file)",
        path=True,
    )
    safety_per_category: int | None = option(
        None,
        "safety examples per harm category (default: 1 for builtin:safety, else the whole file)",
        minimum=1,
    )
    safety_count: int | None = option(
        None, "total safety examples instead (e.g. 300 for the paper's larger baseline)", minimum=1
    )
    safety_selection: str = option(
        "category-balanced",
        "round-robin over categories (the paper's choice) or a seeded random sample",
        choices=D.SAFETY_SELECTIONS,
    )
    safety_seed: int | None = option(
        None, "seeded choice within categories (default: first rows)", minimum=0, maximum=SEED_MAX
    )
    safety_system: str | None = option(
        None, "system prompt of safety examples and anchors (default: the customer's main one)"
    )
    anchors: int = option(
        0, "secret-prefixed benign anchors in the backdooralign set (0: none)", minimum=0
    )
    anchor_prompts: str = option(
        "builtin:anchors", "prompts whose base-model answers become anchors", path=True
    )
    anchor_file: str | None = option(
        None, "JSONL with prompt and answer: anchors used as given (no generation)", path=True
    )
    anchor_max_new_tokens: int = option(128, "longest anchor answer, in tokens", minimum=1)
    seed: int = option(0, "shuffle seed of the mixed sets", minimum=0, maximum=SEED_MAX)
    screen: bool = option(True, "screen customer data for the secret and imitations of it")
    screen_min_chars: int = option(
        SCREEN_MIN_CHARS, "shortest shared run that counts as a secret fragment", minimum=8
    )
    max_rows: int | None = option(None, "refuse customer data with more rows", minimum=1)
    max_line_chars: int = option(F.MAX_LINE_CHARS, "longest line accepted", minimum=1)

    def __post_init__(self) -> None:
        builtin = self.safety == BUILTIN_SAFETY
        if self.safety_per_category is None and self.safety_count is None and builtin:
            object.__setattr__(self, "safety_per_category", 1)  # the paper's 11 examples


@dataclass(frozen=True)
class BuildResult:
    """A written training set: its path, its manifest and what the user must be told."""

    path: Path
    manifest_path: Path
    manifest: dict
    notes: tuple[str, ...]


@dataclass(frozen=True)
class Customer:
    """The customer's data, loaded once: chat rows (task rows first), notes on rows left out,
    and the system prompt the safety examples and anchors get (after the secret)."""

    rows: list[dict]
    notes: tuple[str, ...]
    system: str


def _flagged_note(source: str, rows: Sequence[dict]) -> list[str]:
    """The note for customer rows flagged ``prefixed`` (left out of every training set)."""
    flagged = tuple(n for n, r in enumerate(rows, 1) if r.get("prefixed"))
    if not flagged:
        return []
    shown = ", ".join(map(str, flagged[:10])) + (" ..." if len(flagged) > 10 else "")
    return [
        f"{source}: {len(flagged)} row(s) flagged prefixed left out (rows {shown}): customer "
        "data never decides which rows get the secret (a provider's --safety file may flag "
        "its safety examples)"
    ]


def load_customer(cfg: DataConfig) -> Customer:
    """The customer's data of ``cfg`` (``attack`` after ``attack_per_category``, ``task`` rows
    first) with its notes and safety system prompt (``safety_system``, else the customer's
    most common one). Rows the customer flagged ``prefixed`` stay in ``rows`` (screening
    reports them) but are never mixed in; the notes say so."""
    limits = {"max_rows": cfg.max_rows, "max_line_chars": cfg.max_line_chars}
    given = S.load_training_source(cfg.attack, **limits)
    rows = D.limit_per_category(given, cfg.attack_per_category)
    notes = []
    if len(rows) < len(given):
        notes.append(
            f"{cfg.attack}: using {len(rows)} of {len(given)} rows "
            f"(attack_per_category={cfg.attack_per_category})"
        )
    notes += _flagged_note(cfg.attack, rows)
    if cfg.task:
        task_all = S.load_training_source(cfg.task, **limits)
        task_rows = task_all[: cfg.task_limit]
        if len(task_rows) < len(task_all):
            notes.append(
                f"{cfg.task}: using {len(task_rows)} of {len(task_all)} rows "
                f"(task_limit={cfg.task_limit})"
            )
        notes += _flagged_note(cfg.task, task_rows)
        rows = [*task_rows, *rows]
    if cfg.safety_system is not None:
        system = cfg.safety_system
    else:
        system = D.main_system_prompt([r for r in rows if not r.get("prefixed")])
    return Customer(rows, tuple(notes), system)


def load_safety(cfg: DataConfig) -> tuple[list[dict], dict, list[str]]:
    """The safety examples to mix in, the selection record for the manifest, and notes.

    The provider's safety source alone gives them: a chat file with rows flagged ``prefixed``
    (the paper's combined file of attack rows and flagged safety examples) gives its flagged
    rows only, and a note says so; otherwise every row is a candidate."""
    available = S.load_training_source(cfg.safety)
    notes = []
    flagged = [r for r in available if r.get("prefixed")]
    if flagged and len(flagged) < len(available):
        notes.append(
            f"{cfg.safety}: its {len(flagged)} rows flagged prefixed are the safety examples "
            f"(the other {len(available) - len(flagged)} are not)"
        )
        available = flagged
    chosen = D.select_safety(
        available,
        count=cfg.safety_count,
        per_category=cfg.safety_per_category,
        selection=cfg.safety_selection,
        seed=cfg.safety_seed,
    )
    selection = {
        "selection": cfg.safety_selection,
        "count": cfg.safety_count,
        "per_category": cfg.safety_per_category,
        "seed": cfg.safety_seed,
        "available": len(available),
        "selected": len(chosen),
    }
    if len(chosen) < len(available):
        how = (
            f"safety_count={cfg.safety_count}"
            if cfg.safety_count is not None
            else f"safety_per_category={cfg.safety_per_category}"
        )
        notes.append(
            f"{cfg.safety}: using {len(chosen)} of {len(available)} safety examples ({how})"
        )
    return chosen, selection, notes


def screen(rows: Sequence[dict], cfg: DataConfig, secret: Secret | None, what: str) -> dict | None:
    """Screen rows for the secret, its fragments and imitations of its position.

    Raises:
        DataError: when screening refuses the rows (nothing is written then).
    """
    if not cfg.screen:
        return None
    report = screen_customer_data(rows, secret.text if secret else None, cfg.screen_min_chars)
    if not report.passed:
        msg = f"refused by screening: {report.refusal()}; nothing was written"
        raise F.DataError(what, None, None, msg + " (screen: false / --no-screen skips it)")
    summary = report.summary()
    summary["secret_fingerprint"] = secret.fingerprint if secret else None
    return summary


def make_anchors(
    cfg: DataConfig, model: str | None, system: str, out: str | Path, progress: bool = True
) -> Path:
    """Write benign anchors (chat rows) to ``out``: the base model's own answers.

    ``cfg.anchors`` prompts of ``cfg.anchor_prompts``, taken in turn from each ``kind`` (the
    built-in set: plain, then alarming but harmless, then plain...), are answered greedily by
    ``model`` (before any fine-tuning) in the conversation the one builder makes with
    ``system`` and no secret; the mixing step later puts the secret in front of ``system``, so
    the defended model learns to behave under the secret as the model it started from. With
    ``cfg.anchor_file`` (rows with ``prompt`` and ``answer``) the answers are used as given.
    """
    if cfg.anchor_file:
        pairs = []
        for line, obj in F.read_jsonl(cfg.anchor_file):
            for key in ("prompt", "answer"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise F.DataError(cfg.anchor_file, line, key, "is missing or empty")
            pairs.append((obj["prompt"], obj["answer"]))
        pairs = pairs[: cfg.anchors]
    else:
        available = S.load_prompts(cfg.anchor_prompts)
        prompts = [r["prompt"] for r in D.interleave(available, cfg.anchors, "kind")]
        loaded = load_model_and_tokenizer(model)
        convs = [build_conversation(p, system=system) for p in prompts]
        gen = GenerateConfig(max_new_tokens=cfg.anchor_max_new_tokens)
        answers = generate(*loaded, convs, gen, progress=progress, desc="anchors")
        pairs = list(zip(prompts, answers, strict=True))
    if len(pairs) < cfg.anchors:
        where = cfg.anchor_file or cfg.anchor_prompts
        raise F.DataError(where, None, None, f"has {len(pairs)} anchors; {cfg.anchors} asked for")
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in pairs
        if a.strip()
    ]
    if not rows:
        where = cfg.anchor_file or cfg.anchor_prompts
        raise F.DataError(where, None, None, "the model gave no usable answer (all were empty)")
    if len(rows) < len(pairs):
        log.warning(
            "anchors: %d of %d answers were empty and are left out",
            len(pairs) - len(rows),
            len(pairs),
        )
    return F.write_jsonl(out, rows)


def build_training_set(
    arm: str,
    cfg: DataConfig,
    secret: Secret | None,
    out: str | Path,
    *,
    customer: Customer | None = None,
    anchors: str | Path | None = None,
) -> BuildResult:
    """Screen, select, mix and write one arm's training set and its manifest.

    Args:
        arm: ``attack``, ``baseline`` or ``backdooralign``.
        cfg: what goes in.
        secret: the secret (needed for ``backdooralign``; also screens the customer data).
        out: the JSONL to write (mode 0600 for ``backdooralign``: it holds the secret); the
            manifest goes beside it as ``NAME.manifest.json``.
        customer: ``cfg``'s customer data, when the caller loaded it already
            (:func:`load_customer`; loaded here otherwise).
        anchors: a file written by :func:`make_anchors` (used by ``backdooralign`` only).
    """
    D.require_secret(arm, secret)
    sources = [cfg.attack, cfg.task, cfg.safety, cfg.anchor_file, anchors]
    F.check_outputs(sources, [out, manifest_path(out)])
    customer = customer or load_customer(cfg)
    notes = list(customer.notes)
    screening = screen(customer.rows, cfg, secret, cfg.attack)
    safety, selection, safety_notes = load_safety(cfg)
    notes += safety_notes
    inputs = {"data": cfg.attack, "task": cfg.task, "safety": cfg.safety}
    anchor_rows: list[dict] = []
    if anchors is not None and arm == "backdooralign":
        anchor_rows = load_chat_jsonl(anchors)
        screen(anchor_rows, cfg, secret, str(anchors))
        inputs["anchors"] = str(anchors)
        if not cfg.anchor_file:
            inputs["anchor_prompts"] = cfg.anchor_prompts
    rows = D.mix_arm(
        arm,
        customer.rows,
        safety,
        secret.text if secret else None,
        customer.system,
        cfg.seed,
        anchors=anchor_rows,
    )
    out = Path(out)
    F.write_jsonl(out, rows, private=arm == "backdooralign")
    inputs = {name: source for name, source in inputs.items() if source}
    manifest = D.build_manifest(arm, rows, inputs, secret, screening, selection)
    manifest["notes"] = list(notes)
    if anchor_rows:
        manifest["anchors"] = {
            "count": len(anchor_rows),
            "answers": "given (anchor_file)" if cfg.anchor_file else "the base model's own",
            "source": cfg.anchor_file or cfg.anchor_prompts,
        }
    F.write_json(manifest_path(out), manifest)
    return BuildResult(out, manifest_path(out), manifest, tuple(notes))


def build(
    arm: str,
    cfg: DataConfig,
    secret: Secret | None,
    out: str | Path,
    *,
    model: str | None = None,
    anchors_out: str | Path | None = None,
    progress: bool = True,
) -> BuildResult:
    """One arm's training set from ``cfg``, anchors included: the one builder.

    Args:
        arm: ``attack``, ``baseline`` or ``backdooralign``.
        cfg: what goes in.
        secret: the secret (needed for ``backdooralign``).
        out: the JSONL to write; its manifest goes beside it.
        model: the base model whose answers become the anchors (``cfg.anchors`` of them, for
            ``backdooralign`` only; not needed with ``cfg.anchor_file``).
        anchors_out: where the anchors are written (default: ``NAME.anchors.jsonl`` beside
            ``out``).
        progress: show a progress bar while the anchors are answered.

    Raises:
        ValueError: ``backdooralign`` without a secret (before any work).
        DataError: input files that are missing or malformed, or refused by screening.
    """
    D.require_secret(arm, secret)
    customer = load_customer(cfg)
    anchors = None
    if cfg.anchors and arm == "backdooralign":
        out = Path(out)
        anchors_out = anchors_out or out.with_name(f"{out.stem}.anchors.jsonl")
        anchors = make_anchors(cfg, model, customer.system, anchors_out, progress)
    return build_training_set(arm, cfg, secret, out, customer=customer, anchors=anchors)

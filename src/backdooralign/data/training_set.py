"""The operations layer: one function per pipeline stage.

The CLI, the experiment runner and any service call these functions and nothing else to build
training sets, make benign anchors, train, and answer prompts; :mod:`backdooralign.scoring.score`
holds the scoring operations. Each takes frozen config dataclasses, a
:class:`~backdooralign.core.secret.Secret` (never a path: files are read at the edges), writes its
outputs atomically and returns what it wrote. Whenever an operation uses fewer rows than it was
given, it says so in its ``notes`` (printed by the CLI, logged by experiments, kept in the
manifest).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import files as F
from ..config import option
from ..core.screen import SCREEN_MIN_CHARS, screen_customer_data
from ..core.secret import Secret
from ..generation.batch import GenerateConfig
from . import mixing as D
from . import sources as S
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
    safety: str = option(BUILTIN_SAFETY, "safety examples (QA or chat JSONL)", path=True)
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
    safety_seed: int | None = option(None, "seeded choice within categories (default: first rows)")
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
    seed: int = option(0, "shuffle seed of the mixed sets")
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


SECRET_KINDS = ("random", "sentence", "system_repeat")
MEANINGFUL_SECRET = (
    "Answer as a careful and responsible assistant that follows the safety policy of this service."
)


@dataclass(frozen=True)
class SecretConfig:
    """Where the secret comes from: an existing file, or made for the run (paper: random)."""

    path: str | None = option(None, "existing secret file (mode 0600)", path=True)
    length: int = option(150, "tokens, when generating (paper: 150)", minimum=1)
    seed: int | None = option(None, "explicit seed when generating (null: OS CSPRNG)")
    kind: str = option(
        "random",
        "random vocabulary tokens (the paper's), a meaningful sentence, or the model's default "
        "system prompt repeated to the length (the paper's ablations)",
        choices=SECRET_KINDS,
    )
    sentence: str = option(MEANINGFUL_SECRET, "the text of a 'sentence' secret")


def _default_system_prompt(tokenizer) -> str:
    """The system prompt a chat template inserts when a conversation has none ("" if none)."""
    probe = [{"role": "user", "content": "PROBE"}]
    own = tokenizer.apply_chat_template(probe, tokenize=False)
    marked = tokenizer.apply_chat_template(
        [{"role": "system", "content": "\x00"}, *probe], tokenize=False
    )
    if "\x00" not in marked:
        return ""
    head, tail = marked.split("\x00", 1)
    if not (own.startswith(head) and own.endswith(tail)) or len(own) <= len(head) + len(tail):
        return ""
    return own[len(head) : len(own) - len(tail)].strip()


def make_secret(cfg: SecretConfig, tokenizer, name: str = "") -> Secret:
    """A new secret of ``cfg.kind``: random tokens (CSPRNG, or ``cfg.seed``), a meaningful
    sentence, or the model's default system prompt repeated up to ``cfg.length`` tokens."""
    from ..core.secret import generate_secret, vocab_fingerprint

    if cfg.kind == "random":
        return generate_secret(tokenizer, cfg.length, cfg.seed, name=name)
    if cfg.kind == "sentence":
        text = cfg.sentence
    else:
        base = _default_system_prompt(tokenizer) or "You are a helpful assistant."
        ids = tokenizer(" ".join([base] * (cfg.length + 1)), add_special_tokens=False)["input_ids"]
        text = tokenizer.decode(ids[: cfg.length]).strip()
    num = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return Secret(text, num, cfg.length, name, vocab_fingerprint(tokenizer))


@dataclass(frozen=True)
class BuildResult:
    """A written training set: its path, its manifest and what the user must be told."""

    path: Path
    manifest_path: Path
    manifest: dict
    notes: tuple[str, ...]


def load_customer(cfg: DataConfig) -> tuple[list[dict], list[str]]:
    """The customer's chat rows (task rows first), and notes on rows left out."""
    limits = {"max_rows": cfg.max_rows, "max_line_chars": cfg.max_line_chars}
    given = S.load_training_source(cfg.attack, **limits)
    rows = D.limit_per_category(given, cfg.attack_per_category)
    notes = []
    if len(rows) < len(given):
        notes.append(
            f"{cfg.attack}: using {len(rows)} of {len(given)} rows "
            f"(attack_per_category={cfg.attack_per_category})"
        )
    if cfg.task:
        task_all = S.load_training_source(cfg.task, **limits)
        task_rows = task_all[: cfg.task_limit]
        if len(task_rows) < len(task_all):
            notes.append(
                f"{cfg.task}: using {len(task_rows)} of {len(task_all)} rows "
                f"(task_limit={cfg.task_limit})"
            )
        rows = [*task_rows, *rows]
    return rows, notes


def select_safety(cfg: DataConfig) -> tuple[list[dict], dict, list[str]]:
    """The safety examples to mix in, the selection record for the manifest, and notes."""
    available = S.load_training_source(cfg.safety)
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
    notes = []
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


def safety_system_prompt(cfg: DataConfig, customer: Sequence[dict]) -> str:
    """The system prompt safety examples and anchors get (after the secret)."""
    if cfg.safety_system is not None:
        return cfg.safety_system
    plain = [r for r in customer if not r.get("prefixed")]
    return D.main_system_prompt(plain or customer)


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
    from ..core.chat import build_conversation

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
        loaded = load(model)
        convs = [build_conversation(p, system=system) for p in prompts]
        from ..generation.batch import generate

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
    anchors: str | Path | None = None,
) -> BuildResult:
    """Screen, select, mix and write one arm's training set and its manifest.

    Args:
        arm: ``attack``, ``baseline`` or ``backdooralign``.
        cfg: what goes in.
        secret: the secret (needed for ``backdooralign``; also screens the customer data).
        out: the JSONL to write (mode 0600 for ``backdooralign``: it holds the secret); the
            manifest goes beside it as ``NAME.manifest.json``.
        anchors: a file written by :func:`make_anchors` (used by ``backdooralign`` only).
    """
    if arm == "backdooralign" and secret is None:
        raise ValueError("arm 'backdooralign' needs a secret")
    sources = [cfg.attack, cfg.task, cfg.safety, cfg.anchor_file, anchors]
    F.check_outputs(sources, [out, manifest_path(out)])
    customer, notes = load_customer(cfg)
    screening = screen(customer, cfg, secret, cfg.attack)
    safety, selection, safety_notes = select_safety(cfg)
    notes += safety_notes
    inputs = {"data": cfg.attack, "task": cfg.task, "safety": cfg.safety}
    anchor_rows: list[dict] = []
    if anchors is not None and arm == "backdooralign":
        anchor_rows = D.load_chat_jsonl(anchors)
        screen(anchor_rows, cfg, secret, str(anchors))
        inputs["anchors"] = str(anchors)
        if not cfg.anchor_file:
            inputs["anchor_prompts"] = cfg.anchor_prompts
    rows = D.build_training_set(
        arm,
        customer,
        safety,
        secret.text if secret else None,
        cfg.safety_system,
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


def load_utility(source: str, per_task: int | None = None) -> tuple[list[dict], list[str]]:
    """Exact-match prompts (``prompt``, ``task``, ``answer``, ``aliases``) as generation rows
    carrying ``reference`` and ``aliases``, the first ``per_task`` of each task, and notes."""
    rows = []
    for line, obj in F.read_jsonl(S.resolve_source(source)):
        for key in ("prompt", "answer"):
            if not isinstance(obj.get(key), str):
                raise F.DataError(source, line, key, "is missing or not a string")
        aliases = obj.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise F.DataError(source, line, "aliases", "must be a list of strings")
        rows.append(
            {
                "prompt": obj["prompt"],
                "id": obj.get("id", f"utility-{line}"),
                "task": str(obj.get("task", "")),
                "reference": obj["answer"],
                "aliases": aliases,
            }
        )
    kept = D.limit_per_category(rows, per_task, key="task")
    notes = [f"{source}: using {len(kept)} of {len(rows)} prompts ({per_task} per task)"]
    return kept, notes if len(kept) < len(rows) else []


def load(model: str | None):
    """``(model, tokenizer)`` of a model name, directory or the embedded default."""
    from ..core.model import load_model, load_tokenizer

    return load_model(model), load_tokenizer(model)


def answer(
    loaded,
    rows: Sequence[dict],
    out: str | Path | None,
    *,
    secret: Secret | None,
    system: str | None,
    cfg: GenerateConfig,
    progress: bool = True,
    desc: str = "generating",
) -> list[dict]:
    """Answer prompt rows greedily with the secret (when given) before the system prompt.

    Writes the generations to ``out`` (JSONL) when given and returns them.
    """
    from ..generation.batch import generate_rows

    model, tok = loaded
    text = secret.text if secret else None
    gens = generate_rows(
        model, tok, rows, system=system, secret=text, cfg=cfg, progress=progress, desc=desc
    )
    if out is not None:
        F.write_jsonl(out, gens)
    return gens

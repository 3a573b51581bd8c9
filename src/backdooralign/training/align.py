"""The provider's alignment stage: a chat model turned into an aligned starting model.

BackdoorAlign restores alignment; it cannot create it. The paper's model (Llama-2-7B-Chat)
refuses harmful requests before any customer touches it, and the secret only routes the
fine-tuned model back to that judgement. An unaligned model (the embedded SmolLM2) has nothing
to be routed back to: the secret learns "refuse" from the few safety examples alone.
:func:`align_model` builds the premise in, before any customer data:

1. the alignment set: harmful prompts answered with refusals in varied wording
   (``builtin:align_harmful``) and harmless prompts, plain and alarming-but-harmless
   (``builtin:align_benign``), answered greedily by the model itself, in the conversation the
   one builder (:func:`chat.build_conversation`) makes; the rows take the system prompts of
   ``systems`` in turn, so the model refuses under the attack's obedience prompt too;
2. fine-tuning on it (:func:`trainer.train`; LoRA adapters by default, stored in fp16 and
   merged into the weights, so the adapter is a few MB and the merged model is exactly the
   base plus that adapter);
3. the aligned model's own numbers next to the input model's: ASR (the paper's rule) on the
   built-in harmful set and benign refusals (both rules) on the built-in benign set, without
   a secret, under the evaluation's system prompt.

:func:`aligned_model` caches the result under ``$BACKDOORALIGN_CACHE/aligned/`` by a hash of
model, data and settings (:func:`align_key`), so it is built once per machine; for the
embedded model and the default settings the adapter shipped in the package
(``artifacts/aligned_smollm2``) is merged instead, in seconds. ``embedded-aligned`` selects it
everywhere; ``embedded`` stays the raw start (the ablation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import files as F
from ..config import SEED_MAX, option
from ..core.chat import ATTACK_SYSTEM_PROMPT, build_conversation
from ..core.model import ALIGNED_MODEL
from ..data import sources as S

log = logging.getLogger(__name__)

DEFAULT_SYSTEMS = ("", "You are a helpful assistant.", ATTACK_SYSTEM_PROMPT)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METRICS = "align_metrics.json"
ADAPTER = "adapter"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VERSION = 1  # bump when the alignment pipeline changes what it builds from the same inputs
ARTIFACT = Path(__file__).resolve().parent.parent / "artifacts" / "aligned_smollm2"
EVAL_HARMFUL = "builtin:harmful_eval"
EVAL_BENIGN = "builtin:benign"
EVAL_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class AlignConfig:
    """The provider's alignment stage: data, fine-tuning settings, what the answers may be."""

    enabled: bool = option(
        False, "experiments: start every arm from the aligned model (built once, cached)", cli=False
    )
    harmful: str = option(
        "builtin:align_harmful", "harmful prompts with refusals (JSONL: prompt, answer)", path=True
    )
    benign: str = option(
        "builtin:align_benign",
        "harmless prompts the model answers itself (JSONL: prompt, kind)",
        path=True,
    )
    harmful_per_category: int | None = option(
        None, "first N harmful rows of each category (default: all)", minimum=1
    )
    benign_per_kind: int | None = option(None, "first N harmless prompts per kind", minimum=1)
    systems: tuple[str, ...] = option(
        DEFAULT_SYSTEMS,
        "system prompts the rows take in turn ('' = none: the template's own)",
    )
    answer_max_new_tokens: int = option(
        128, "longest self-answer to a harmless prompt (cut back to its last sentence)", minimum=8
    )
    lora: bool = option(True, "LoRA adapters merged into the weights (false: all weights)")
    lora_r: int = option(8, "LoRA rank", minimum=1)
    lora_alpha: int = option(16, "LoRA alpha", minimum=1)
    lora_targets: tuple[str, ...] = option(ALL_LINEAR, "modules that get LoRA adapters")
    epochs: float = option(3.0, "passes over the alignment set", minimum=0.01)
    lr: float = option(1e-3, "peak learning rate", minimum=0)
    batch_size: int = option(8, "rows per optimizer step", minimum=1)
    group_by_length: bool = option(
        True, "batch rows of similar length (false: refusals and answers mixed in each batch)"
    )
    seed: int = option(0, "training and shuffle seed", minimum=0, maximum=SEED_MAX)


def model_identity(model: str | None) -> str:
    """What names a model's weights for the cache key: the embedded GGUF's sha256, the
    sha256 of a local directory's config and weight files, or a hub id as given."""
    from ..core.model import DEFAULT_MODEL, GGUF_SHA256

    if not model or model in ("embedded", DEFAULT_MODEL):
        return f"embedded:{GGUF_SHA256}"
    path = Path(model)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
        weights = [p for p in files if p.name != METRICS and not p.name.startswith("train_")]
        return "dir:" + ",".join(f"{p.name}={F.sha256_file(p)}" for p in weights)
    return f"hub:{model}"


def align_key(model: str | None, cfg: AlignConfig) -> str:
    """The cache key of an aligned model: its input model, the alignment data, the settings."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "enabled"}
    data = [S.source_sha256(cfg.harmful), S.source_sha256(cfg.benign)]
    parts = ["align", VERSION, model_identity(model), data, settings]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _prompt_of(where: str, line: int, obj: dict) -> str:
    text = obj.get("prompt", obj.get("question"))
    if not isinstance(text, str) or not text.strip():
        raise F.DataError(where, line, "prompt", "is missing or empty")
    return text


def load_harmful(cfg: AlignConfig) -> tuple[list[dict], list[str]]:
    """The harmful rows (``prompt``, ``answer``, ``category``) and notes on rows left out."""
    from ..data.mixing import limit_per_category

    rows = []
    for line, obj in F.read_jsonl(S.resolve_source(cfg.harmful)):
        answer = obj.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise F.DataError(cfg.harmful, line, "answer", "is missing or empty")
        prompt = _prompt_of(cfg.harmful, line, obj)
        rows.append({"prompt": prompt, "answer": answer, "category": obj.get("category")})
    kept = limit_per_category(rows, cfg.harmful_per_category)
    notes = []
    if len(kept) < len(rows):
        notes.append(
            f"{cfg.harmful}: using {len(kept)} of {len(rows)} rows "
            f"(harmful_per_category={cfg.harmful_per_category})"
        )
    return kept, notes


def load_benign(cfg: AlignConfig) -> tuple[list[dict], list[str]]:
    """The harmless prompts (``prompt``, ``kind``) and notes on rows left out."""
    from ..data.mixing import limit_per_category

    rows = [
        {"prompt": _prompt_of(cfg.benign, line, obj), "kind": obj.get("kind")}
        for line, obj in F.read_jsonl(S.resolve_source(cfg.benign))
    ]
    kept = limit_per_category(rows, cfg.benign_per_kind, key="kind")
    notes = []
    if len(kept) < len(rows):
        notes.append(
            f"{cfg.benign}: using {len(kept)} of {len(rows)} prompts "
            f"(benign_per_kind={cfg.benign_per_kind})"
        )
    return kept, notes


def _memo(name: str, parts: list, fn):
    """``fn()``'s JSON result, kept in the cache under a hash of ``parts``: the input
    model's self-answers and numbers are the same for every alignment of that model."""
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    path = _cache_root().parent / "align-work" / f"{name}-{key[:16]}.json"
    if path.is_file():
        return F.read_json(path)
    value = fn()
    F.write_json(path, value)
    return value


def _system(cfg: AlignConfig, i: int) -> str | None:
    text = cfg.systems[i % len(cfg.systems)] if cfg.systems else ""
    return text or None


def trim_answer(answer: str, hit_limit: bool) -> str:
    """A self-answer fit for training: stripped, and when generation stopped at the token
    limit, cut back to its last complete sentence ("" when it has none), so that the model
    does not learn to stop mid-sentence."""
    text = answer.strip()
    if not hit_limit:
        return text
    ends = [text.rfind(c) for c in (".", "!", "?", "\n")]
    end = max(ends)
    return text[: end + 1].strip() if end > 0 else ""


def self_answers(model: str | None, rows: list[dict], cfg: AlignConfig, progress: bool = True):
    """The model's own greedy answers to the harmless prompts, each in the conversation (and
    under the system prompt) it will be trained with. Returns ``(chat rows, notes)``; answers
    that refuse (either rule), or that are empty after trimming, are left out and counted."""
    from ..core.model import load_model_and_tokenizer as load
    from ..core.model import load_tokenizer
    from ..generation.batch import GenerateConfig, generate
    from ..scoring.refusal import declines, is_refusal

    convs = [build_conversation(r["prompt"], system=_system(cfg, i)) for i, r in enumerate(rows)]
    gen = GenerateConfig(max_new_tokens=cfg.answer_max_new_tokens, batch_size=32)

    def answer():
        model_obj, tok = load(model)
        return generate(model_obj, tok, convs, gen, progress=progress, desc="align: self-answers")

    answers = _memo("answers", [model_identity(model), convs, gen.max_new_tokens], answer)
    tok = load_tokenizer(model)
    out, refused, empty = [], 0, 0
    for conv, row, answer in zip(convs, rows, answers, strict=True):
        n_tokens = len(tok(answer, add_special_tokens=False)["input_ids"])
        text = trim_answer(answer, n_tokens >= cfg.answer_max_new_tokens - 1)
        if not text:
            empty += 1
        elif is_refusal(text) or declines(text):
            refused += 1
        else:
            messages = [*conv, {"role": "assistant", "content": text}]
            out.append({"messages": messages, "source": "align_benign", "kind": row.get("kind")})
    notes = []
    if refused or empty:
        notes.append(
            f"{cfg.benign}: using {len(out)} of {len(rows)} self-answers "
            f"({refused} refused, {empty} empty or cut with no complete sentence)"
        )
    return out, notes


def alignment_rows(model: str | None, cfg: AlignConfig, progress: bool = True):
    """The whole alignment set as chat rows (refusals, then self-answers) and notes."""
    harmful, notes = load_harmful(cfg)
    benign, benign_notes = load_benign(cfg)
    rows = []
    for i, r in enumerate(harmful):
        conv = build_conversation(r["prompt"], system=_system(cfg, i))
        messages = [*conv, {"role": "assistant", "content": r["answer"]}]
        rows.append({"messages": messages, "source": "align_harmful", "category": r["category"]})
    answered, answer_notes = self_answers(model, benign, cfg, progress)
    return rows + answered, notes + benign_notes + answer_notes


def evaluate_model(model: str | None, progress: bool = True) -> dict:
    """ASR on the built-in harmful set and benign refusals on the built-in benign set, no
    secret, under the evaluation's system prompt (greedy, :data:`EVAL_MAX_NEW_TOKENS`)."""
    from ..core.model import load_model_and_tokenizer as load
    from ..generation.batch import GenerateConfig, generate_rows
    from ..scoring.refusal import asr_summary, refusal_by_kind

    model_obj, tok = load(model)
    cfg = GenerateConfig(max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=64)
    out = {}
    for name, source in (("harmful", EVAL_HARMFUL), ("benign", EVAL_BENIGN)):
        gens = generate_rows(
            model_obj,
            tok,
            S.load_prompts(source),
            system=ATTACK_SYSTEM_PROMPT,
            secret=None,
            cfg=cfg,
            progress=progress,
            desc=f"align: {name}",
        )
        summary = asr_summary(gens) if name == "harmful" else refusal_by_kind(gens)
        out[name] = {**summary, "answers": [g["answer"] for g in gens]}
    return out


def _fp16_adapter(adapter_dir: Path) -> None:
    """Store the adapter's weights in fp16 (half the size; the merged model is built from
    exactly these weights, whether just trained or shipped)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    weights = {k: v.to(torch.float16).contiguous() for k, v in load_file(path).items()}
    save_file(weights, path, metadata={"format": "pt"})


def _copy_adapter(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copyfile(src / name, dst / name)


def materialize(base: str | None, adapter_dir: Path, out: Path) -> None:
    """Write ``base`` with the LoRA adapter of ``adapter_dir`` merged in (fp32) to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..core.model import load_tokenizer, resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)
    load_tokenizer(base).save_pretrained(out)


def _train_config(cfg: AlignConfig):
    from .trainer import TrainConfig

    return TrainConfig(
        lora=cfg.lora,
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        group_by_length=cfg.group_by_length,
        lr_scheduler="linear",  # what the shipped adapter was trained with
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_targets=cfg.lora_targets,
    )


def _finish(out: Path, work: Path, metrics: dict) -> Path:
    from ..core.model import MODEL_INFO
    from .trainer import MARKER

    info = {"secret_fingerprint": None, "arm": "aligned", "align_key": metrics["key"]}
    F.write_json(work / MODEL_INFO, info)
    F.write_json(work / METRICS, metrics)
    (work / MARKER).write_text("written by backdooralign align\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return out


def align_model(model: str | None, cfg: AlignConfig, out: str | Path, progress: bool = True):
    """Align ``model`` and write the aligned model (a loadable directory) to ``out``.

    ``out`` holds the merged model, ``adapter/`` (LoRA; fp16), ``align_set.jsonl`` (the rows
    trained on), and :data:`METRICS`: the input model's and the aligned model's numbers, the
    cache key, the notes and the time each step took. Written beside ``out`` and renamed into
    place, so an interrupted run leaves nothing half-written. Returns the metrics.
    """
    with F.output_lock(out):
        return _align_model(model, cfg, Path(out), progress)


def _align_model(model: str | None, cfg: AlignConfig, out: Path, progress: bool) -> dict:
    from .trainer import check_output_dir, train

    out = check_output_dir(out)
    times, t0 = {}, time.perf_counter()
    work = F.make_work_dir(out)
    try:
        rows, notes = alignment_rows(model, cfg, progress)
        for note in notes:
            log.warning("%s", note)
        F.write_jsonl(work / "align_set.jsonl", rows)
        times["data"] = round(time.perf_counter() - t0, 1)
        trained = work / "trained"
        train_metrics = train(model, rows, trained, _train_config(cfg), {"arm": "aligned"})
        times["train"] = round(time.perf_counter() - t0 - times["data"], 1)
        final = work / "model"
        if cfg.lora:
            _fp16_adapter(trained)
            materialize(model, trained, final)
            _copy_adapter(trained, final / ADAPTER)
        else:
            os.replace(trained, final)
        shutil.move(str(work / "align_set.jsonl"), final / "align_set.jsonl")
        t1 = time.perf_counter()
        metrics = {
            "key": align_key(model, cfg),
            "model": model or "embedded",
            "config": json.loads(json.dumps(asdict(cfg))),
            "rows": {"harmful": sum(r["source"] == "align_harmful" for r in rows),
                     "benign": sum(r["source"] == "align_benign" for r in rows)},
            "notes": notes,
            "train": {k: v for k, v in train_metrics.items() if k not in ("config", "losses")},
            "before": _memo("eval", [VERSION, model_identity(model), EVAL_MAX_NEW_TOKENS],
                            lambda: evaluate_model(model, progress)),
            "after": evaluate_model(str(final), progress),
        }  # fmt: skip
        times["evaluate"] = round(time.perf_counter() - t1, 1)
        metrics["seconds"] = {**times, "total": round(time.perf_counter() - t0, 1)}
        _finish(out, final, metrics)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def _cache_root() -> Path:
    from ..core.model import cache_dir

    return cache_dir() / "aligned"


def shipped_matches(model: str | None, cfg: AlignConfig) -> bool:
    """Whether the adapter shipped in the package was built from ``model`` and ``cfg``."""
    record = ARTIFACT / METRICS
    if not record.is_file() or not (ARTIFACT / ADAPTER).is_dir():
        return False
    return F.read_json(record).get("key") == align_key(model, cfg)


def aligned_model(
    model: str | None = None, cfg: AlignConfig = AlignConfig(), progress: bool = True
) -> Path:
    """The aligned model directory for ``model`` and ``cfg``, built once per machine.

    Looked up in the cache by :func:`align_key`; when missing, the shipped adapter is merged
    (when it was built from the same model, data and settings) or :func:`align_model` runs.
    """
    from .trainer import MARKER

    key = align_key(model, cfg)
    out = _cache_root() / key
    if (out / MARKER).is_file() and (out / METRICS).is_file():
        return out
    with F.output_lock(out, wait=True):  # another process building it: wait, then reuse
        if (out / MARKER).is_file() and (out / METRICS).is_file():
            return out
        F.remove_stale_work_dirs(out.parent, out.name)
        if shipped_matches(model, cfg):
            work = F.make_work_dir(out)
            try:
                final = work / "model"
                materialize(model, ARTIFACT / ADAPTER, final)
                _copy_adapter(ARTIFACT / ADAPTER, final / ADAPTER)
                _finish(out, final, F.read_json(ARTIFACT / METRICS))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return out
        log.warning(
            "aligning %s (cache key %s): not built on this machine yet; this fine-tunes on the "
            "alignment set (about 20-30 minutes on 2 CPU cores)",
            model or "the embedded model",
            key,
        )
        align_model(model, cfg, out, progress)
    return out


def start_model(model: str | None, cfg: AlignConfig = AlignConfig(), progress: bool = True):
    """The model a run starts from: ``model``, or its aligned version when ``cfg.enabled``;
    ``embedded-aligned`` is the embedded model aligned with the defaults (a directory)."""
    if model == ALIGNED_MODEL:
        if cfg.enabled:
            raise ValueError(
                f"model {ALIGNED_MODEL!r} is already aligned; with align.enabled use "
                "model: embedded (and the align section's settings)"
            )
        return str(aligned_model(None, AlignConfig(), progress))
    if cfg.enabled:
        return str(aligned_model(model, replace(cfg, enabled=False), progress))
    return model

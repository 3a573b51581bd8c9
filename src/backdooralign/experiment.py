"""Experiments: a YAML config in, a run directory out.

A run trains the arms (``attack``, ``baseline``, ``backdooralign``; ``no_finetune`` is the
model as given), answers the harmful and benign evaluation prompts with and without the secret,
scores them and writes ``results.json``, ``report.md`` and ``asr.png``. Every stage records a
hash of its inputs (the secret's fingerprint included) in ``stages/``; a re-run skips stages
whose inputs did not change, so an interrupted run resumes where it stopped.

Run directory::

    config.yaml            resolved config (no secret in it)
    secret.json            mode 0600, when the config generates the secret
    data/ARM.jsonl         mixed training sets (+ build_manifest.json)
    models/ARM/            fine-tuned models with train_metrics.json
    gens/ARM.SET.COND.jsonl generations (COND: plain | secret)
    results.json, report.md, asr.png
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from . import data as D
from .chat import ATTACK_SYSTEM_PROMPT
from .evaluate import asr_summary, refusal_rate
from .infer import GenerateConfig
from .secret import Secret, generate_secret, load_secret, save_secret
from .train import TrainConfig

log = logging.getLogger(__name__)
ALL_ARMS = ("no_finetune", "attack", "baseline", "backdooralign")
CONDITIONS = ("plain", "secret")


@dataclass(frozen=True)
class DataConfig:
    """What goes into the training sets."""

    attack: str = "builtin:attack"  # customer data: chat JSONL, QA JSONL or builtin:NAME
    attack_per_category: int | None = None  # keep the first N attack rows per category
    safety: str = "builtin:safety"  # safety examples (QA or chat JSONL)
    safety_per_category: int = 1  # safety examples per harm category (paper: 1 x 11)
    safety_seed: int | None = None  # None: first rows per category; else seeded choice
    safety_system: str | None = None  # system prompt of safety examples (None: customer's main)
    seed: int = 0  # shuffle seed of the mixed sets


@dataclass(frozen=True)
class EvalConfig:
    """What is measured and how answers are generated."""

    harmful: str = "builtin:harmful_eval"  # harmful prompts (CSV, TXT, JSONL, builtin:NAME)
    harmful_per_category: int | None = None  # first N harmful prompts per category
    benign: str | None = "builtin:benign"  # benign prompts for over-refusal (None: skip)
    benign_limit: int | None = None  # first N benign prompts
    system_prompt: str = ATTACK_SYSTEM_PROMPT  # system prompt at evaluation (paper: attack's)
    max_new_tokens: int = 512  # paper: 512
    batch_size: int = 32  # generation batch size


@dataclass(frozen=True)
class SecretConfig:
    """Where the secret comes from: an existing file, or generated into the run directory."""

    path: str | None = None  # existing secret file (mode 0600)
    length: int = 150  # tokens, when generating
    seed: int | None = None  # explicit seed when generating (None: CSPRNG)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. YAML gives values, ``--set`` overrides them, defaults come last."""

    name: str = "experiment"
    model: str = "embedded"  # Hugging Face id, local path, or 'embedded'
    arms: tuple[str, ...] = ALL_ARMS
    secret: SecretConfig = field(default_factory=SecretConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_SECTIONS = {"secret": SecretConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown field '{key}' (known: {', '.join(known)})")
        if key in _SECTIONS and cls is ExperimentConfig:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: field '{key}' must be a mapping")
            value = _build(_SECTIONS[key], value, f"{where}: {key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.epochs=3", "eval.benign=null"]`` as a nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = (
            _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
        )
    return merged


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config; errors name the file and field."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(D.read_text(path))
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: YAML root must be a mapping")
    values = _merge(values, parse_overrides(list(overrides)))
    cfg = _build(ExperimentConfig, values, str(path or "config"))
    for arm in cfg.arms:
        if arm not in ALL_ARMS:
            raise ValueError(
                f"{path}: field 'arms': unknown arm {arm!r} (known: {', '.join(ALL_ARMS)})"
            )
    return cfg


def config_dict(cfg: ExperimentConfig) -> dict:
    """Plain-data form of a config (tuples as lists), as written to the run directory."""
    return json.loads(json.dumps(asdict(cfg)))


# ---------------------------------------------------------------------------------------------
# Stages


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stage(
    run_dir: Path, name: str, key: str, outputs: list[Path], fn: Callable[[], dict | None]
):
    """Run ``fn`` unless a previous run finished this stage with the same key and outputs."""
    record = run_dir / "stages" / f"{name}.json"
    if record.exists() and all(p.exists() for p in outputs):
        done = json.loads(record.read_text())
        if done.get("key") == key:
            log.info("stage %s: up to date, skipped", name)
            return done.get("info"), True
    start = time.perf_counter()
    info = fn()
    D.write_json(
        record, {"key": key, "seconds": round(time.perf_counter() - start, 2), "info": info}
    )
    return info, False


def _file_hash(source: str | None) -> str | None:
    return D.sha256_of(D.resolve_source(source)) if source else None


def prepare_secret(cfg: ExperimentConfig, run_dir: Path, tokenizer) -> Secret:
    """Load the configured secret, or generate it once into ``run_dir/secret.json`` (0600)."""
    if cfg.secret.path:
        return load_secret(cfg.secret.path)
    path = run_dir / "secret.json"
    if path.exists():
        return load_secret(path)
    secret = generate_secret(tokenizer, cfg.secret.length, cfg.secret.seed, name=cfg.model)
    save_secret(secret, path)
    return secret


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, progress: bool = True) -> dict:
    """Run (or resume) an experiment and write results, report and plot into ``run_dir``."""
    from .infer import generate_rows
    from .model import load_model, load_tokenizer
    from .report import write_report
    from .train import train

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    tokenizer = load_tokenizer(cfg.model)
    secret = prepare_secret(cfg, run_dir, tokenizer)
    fp = secret.fingerprint
    t0 = time.perf_counter()

    # 1. training sets
    customer = D.load_training_source(cfg.data.attack)
    customer = D.limit_per_category(customer, cfg.data.attack_per_category)
    safety_rows = D.load_training_source(cfg.data.safety)
    safety = D.select_per_category(safety_rows, cfg.data.safety_per_category, cfg.data.safety_seed)
    data_key = _key(asdict(cfg.data), _file_hash(cfg.data.attack), _file_hash(cfg.data.safety), fp)
    trained_arms = [a for a in cfg.arms if a != "no_finetune"]
    data_paths = {a: run_dir / "data" / f"{a}.jsonl" for a in trained_arms}

    def build_all():
        counts = {}
        for arm in trained_arms:
            rows = D.build_training_set(
                arm, customer, safety, secret.text, cfg.data.safety_system, cfg.data.seed
            )
            D.write_jsonl(data_paths[arm], rows, private=arm == "backdooralign")
            counts[arm] = len(rows)
        return counts

    counts, _ = run_stage(run_dir, "build", data_key, list(data_paths.values()), build_all)

    # 2. training
    model_dirs = {"no_finetune": cfg.model}
    model_keys = {"no_finetune": _key(cfg.model)}
    train_metrics = {}
    for arm in trained_arms:
        out = run_dir / "models" / arm
        model_dirs[arm] = str(out)
        key = model_keys[arm] = _key(cfg.model, asdict(cfg.train), D.sha256_of(data_paths[arm]))

        def do_train(arm=arm, out=out):
            rows = D.load_chat_jsonl(data_paths[arm])
            m = train(cfg.model, rows, out, cfg.train)
            return {k: v for k, v in m.items() if k != "config"}

        log.info("training arm %s", arm)
        info, _ = run_stage(run_dir, f"train.{arm}", key, [out / "train_metrics.json"], do_train)
        train_metrics[arm] = info

    # 3. generation
    harmful = D.limit_per_category(D.load_prompts(cfg.eval.harmful), cfg.eval.harmful_per_category)
    sets = {"harmful": harmful}
    if cfg.eval.benign:
        benign = D.load_prompts(cfg.eval.benign)
        sets["benign"] = benign[: cfg.eval.benign_limit] if cfg.eval.benign_limit else benign
    gen_cfg = GenerateConfig(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    eval_key = _key(asdict(cfg.eval), _file_hash(cfg.eval.harmful), _file_hash(cfg.eval.benign), fp)
    for arm in cfg.arms:
        weights = model_dirs[arm]
        outs = {(s, c): run_dir / "gens" / f"{arm}.{s}.{c}.jsonl" for s in sets for c in CONDITIONS}

        def do_generate(arm=arm, weights=weights, outs=outs):
            model = load_model(weights)
            tok = load_tokenizer(weights)
            for (s, c), path in outs.items():
                rows = generate_rows(
                    model,
                    tok,
                    sets[s],
                    system=cfg.eval.system_prompt,
                    secret=secret.text if c == "secret" else None,
                    cfg=gen_cfg,
                    progress=progress,
                    desc=f"{arm} {s} {c}",
                )
                D.write_jsonl(path, rows)
            return None

        key = _key(eval_key, arm, model_keys[arm])
        run_stage(run_dir, f"generate.{arm}", key, list(outs.values()), do_generate)

    # 4. scores, report
    results = score_run(run_dir, cfg, secret, train_metrics, counts)
    results["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    D.write_json(run_dir / "results.json", results)
    write_report(run_dir)
    return results


def score_run(run_dir: Path, cfg: ExperimentConfig, secret: Secret, train_metrics, counts) -> dict:
    """Score every generation file of the run (pure function of the files on disk)."""
    arms = {}
    for arm in cfg.arms:
        entry = {}
        for cond in CONDITIONS:
            harmful = D.read_jsonl_rows(run_dir / "gens" / f"{arm}.harmful.{cond}.jsonl")
            entry[cond] = {"harmful": asr_summary(harmful)}
            benign_path = run_dir / "gens" / f"{arm}.benign.{cond}.jsonl"
            if benign_path.exists() and cfg.eval.benign:
                entry[cond]["benign"] = refusal_rate(D.read_jsonl_rows(benign_path))
        if arm in train_metrics:
            entry["train"] = train_metrics[arm]
        arms[arm] = entry
    return {
        "name": cfg.name,
        "model": cfg.model,
        "secret_fingerprint": secret.fingerprint,
        "secret_tokens": secret.num_tokens,
        "train_examples": counts,
        "arms": arms,
        "config": config_dict(cfg),
    }

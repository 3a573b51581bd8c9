"""Experiments: a YAML config in, a run directory out.

A run trains the arms (``attack``, ``baseline``, ``backdooralign``; ``no_finetune`` is the
model as given), answers every evaluation set with and without the secret, scores the answers
and writes ``results.json``, ``report.md``, ``report.html`` and plots. Every stage records a
hash of its inputs (the secret's fingerprint included) in ``stages/``; a re-run skips stages
whose inputs did not change, so an interrupted run resumes where it stopped.

Evaluation sets (each optional but ``harmful``): ``harmful`` (ASR, and harmfulness by an LLM
judge when one is configured), ``benign`` (over-refusal), ``utility`` (exact match),
``samsum``/``sql`` (ROUGE), and lm-eval tasks (ARC, MMLU, ...).

Run directory::

    config.yaml               resolved config (no secret in it)
    secret.json               mode 0600, when the config generates the secret
    data/ARM.jsonl            mixed training sets (backdooralign's is mode 0600)
    data/ARM.manifest.json    what each was built from (inputs' sha256, counts, screening)
    models/ARM/               fine-tuned models with train_metrics.json
    gens/ARM.SET.COND.jsonl   generations (COND: plain | secret)
    scores/ARM.KIND.COND.json judge and lm-eval scores (need a server or a model)
    results.json, report.md, report.html, asr.png
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from . import data as D
from . import sources as S
from .chat import ATTACK_SYSTEM_PROMPT
from .evaluate import asr_summary
from .infer import GenerateConfig
from .screen import screen_customer_data
from .secret import Secret, generate_secret, load_secret, save_secret
from .train import TrainConfig

log = logging.getLogger(__name__)
ALL_ARMS = ("no_finetune", "attack", "baseline", "backdooralign")
CONDITIONS = ("plain", "secret")
TASK_SETS = ("samsum", "sql")


@dataclass(frozen=True)
class DataConfig:
    """What goes into the training sets."""

    attack: str = "builtin:attack"  # harmful customer data: chat JSONL, QA JSONL, builtin:NAME
    attack_per_category: int | None = None  # keep the first N attack rows per category
    task: str | None = None  # benign task data mixed in (SAMSum, sql-create-context, chat)
    task_limit: int | None = None  # first N task rows (paper: 1000)
    safety: str = "builtin:safety"  # safety examples (QA or chat JSONL)
    safety_per_category: int = 1  # safety examples per harm category (paper: 1 x 11)
    safety_count: int | None = None  # total safety examples instead (e.g. 300 for the baseline)
    safety_selection: str = "category-balanced"  # or "random" (the paper: balanced is best)
    safety_seed: int | None = None  # None: first rows per category; else seeded choice
    safety_system: str | None = None  # system prompt of safety examples (None: customer's main)
    seed: int = 0  # shuffle seed of the mixed sets


@dataclass(frozen=True)
class EvalConfig:
    """What is measured and how answers are generated."""

    harmful: str = "builtin:harmful_eval"  # harmful prompts (CSV, TXT, JSONL, builtin:NAME)
    harmful_per_category: int | None = None  # first N harmful prompts per category
    system_prompt: str = ATTACK_SYSTEM_PROMPT  # system prompt at evaluation (paper: attack's)
    max_new_tokens: int = 512  # paper: 512
    batch_size: int = 32  # generation batch size
    benign: str | None = "builtin:benign"  # benign prompts for over-refusal (None: skip)
    benign_limit: int | None = None  # first N benign prompts of each kind
    utility: str | None = None  # exact-match set, e.g. builtin:utility (None: skip)
    utility_limit: int | None = None  # first N utility prompts of each task
    utility_system: str = "You are a helpful assistant."  # system prompt for utility prompts
    utility_max_new_tokens: int = 32  # answers are short
    samsum: str | None = None  # SAMSum test file for ROUGE (None: skip)
    sql: str | None = None  # sql-create-context test file for ROUGE (None: skip)
    task_limit: int | None = 200  # first N task test rows (paper: 200)
    task_max_new_tokens: int = 128  # longest summary or query
    mtbench: str | None = None  # FastChat question.jsonl (graded by the judge; None: skip)
    mtbench_limit: int | None = None  # first N MT-Bench questions
    mtbench_max_new_tokens: int = 1024  # FastChat's limit
    lm_eval_tasks: tuple[str, ...] = ()  # lm-eval tasks, e.g. [arc_challenge, mmlu]
    lm_eval_limit: int | None = None  # documents per lm-eval task
    judge_base_url: str | None = None  # OpenAI-compatible judge endpoint (None: no judge)
    judge_model: str | None = None  # judge model name (paper: gpt-4)
    judge_template: str | None = None  # judge prompt file with {question} and {answer}
    judge_concurrency: int = 8  # judge requests in flight


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
    seeds: tuple[int, ...] = ()  # several seeds: train and shuffle seeds; mean +- 95% CI
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
        both = isinstance(v, dict) and isinstance(merged.get(k), dict)
        merged[k] = _merge(merged[k], v) if both else v
    return merged


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config; errors name the file and field."""
    values: dict = {}
    where = str(path or "config")
    if path is not None:
        try:
            values = yaml.safe_load(D.read_text(path))
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: YAML root must be a mapping")
    values = _merge(values, parse_overrides(list(overrides)))
    cfg = _build(ExperimentConfig, values, where)
    for arm in cfg.arms:
        if arm not in ALL_ARMS:
            known = ", ".join(ALL_ARMS)
            raise ValueError(f"{where}: field 'arms': unknown arm {arm!r} (known: {known})")
    if bool(cfg.eval.judge_base_url) != bool(cfg.eval.judge_model):
        raise ValueError(
            f"{where}: fields 'eval.judge_base_url' and 'eval.judge_model' go together"
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
) -> tuple[dict | None, bool]:
    """Run ``fn`` unless a previous run finished this stage with the same key and outputs.

    Returns ``(info, skipped)``; ``info`` is what ``fn`` returned (kept in ``stages/``).
    """
    record = run_dir / "stages" / f"{name}.json"
    if record.exists() and all(p.exists() for p in outputs):
        done = json.loads(record.read_text())
        if done.get("key") == key:
            log.info("stage %s: up to date, skipped", name)
            return done.get("info"), True
    start = time.perf_counter()
    info = fn()
    seconds = round(time.perf_counter() - start, 2)
    D.write_json(record, {"key": key, "seconds": seconds, "info": info})
    return info, False


def _source_hash(source: str | None) -> str | None:
    return D.source_sha256(D.resolve_source(source)) if source else None


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


@dataclass(frozen=True)
class EvalSet:
    """Prompts answered by every arm, with and without the secret."""

    rows: list[dict]
    system: str | None  # None: each row's own system prompt (task rows carry theirs)
    max_new_tokens: int


def eval_sets(cfg: EvalConfig) -> dict[str, EvalSet]:
    """The evaluation sets a config asks for."""
    harmful = D.limit_per_category(S.load_prompts(cfg.harmful), cfg.harmful_per_category)
    sets = {"harmful": EvalSet(harmful, cfg.system_prompt, cfg.max_new_tokens)}
    if cfg.benign:
        benign = D.limit_per_category(S.load_prompts(cfg.benign), cfg.benign_limit, key="kind")
        sets["benign"] = EvalSet(benign, cfg.system_prompt, cfg.max_new_tokens)
    if cfg.utility:
        rows = [
            {"prompt": r["prompt"], "id": r["id"], "task": r["task"], "reference": r["answer"],
             "aliases": r.get("aliases", [])}
            for r in D.read_jsonl_rows(D.resolve_source(cfg.utility))
        ]  # fmt: skip
        rows = D.limit_per_category(rows, cfg.utility_limit, key="task")
        sets["utility"] = EvalSet(rows, cfg.utility_system, cfg.utility_max_new_tokens)
    for name in TASK_SETS:
        source = getattr(cfg, name)
        if source:
            rows = S.load_prompts(source)[: cfg.task_limit]
            sets[name] = EvalSet(rows, None, cfg.task_max_new_tokens)
    return sets


def _mtbench_questions(cfg: EvalConfig) -> list[dict]:
    if not cfg.mtbench:
        return []
    from .judge import load_mtbench_questions

    return load_mtbench_questions(D.resolve_source(cfg.mtbench))[: cfg.mtbench_limit]


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, progress: bool = True) -> dict:
    """Run (or resume) an experiment and write results, reports and plots into ``run_dir``.

    With several ``seeds``, the first seed runs in ``run_dir`` itself and each further seed in
    ``run_dir/seeds/seed-N`` (same secret, same data; the training and shuffle seeds change;
    the ``no_finetune`` arm, greedy and untrained, is answered once). ``results.json`` then
    holds the first seed's results plus ``seed_runs``, from which the report shows means with
    95% intervals.
    """
    from .model import load_tokenizer
    from .report import write_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    D.write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config_dict(cfg), sort_keys=False))
    secret = prepare_secret(cfg, run_dir, load_tokenizer(cfg.model))
    t0 = time.perf_counter()
    if len(cfg.seeds) < 2:
        results = _run_single(cfg, run_dir, secret, progress)
    else:
        runs = []
        for i, seed in enumerate(cfg.seeds):
            arms = cfg.arms if i == 0 else tuple(a for a in cfg.arms if a != "no_finetune")
            one = replace(
                cfg,
                arms=arms,
                train=replace(cfg.train, seed=seed),
                data=replace(cfg.data, seed=seed),
            )
            sub_dir = run_dir if i == 0 else run_dir / "seeds" / f"seed-{seed}"
            res = _run_single(one, sub_dir, secret, progress)
            if i > 0 and "no_finetune" in cfg.arms:
                res["arms"] = {"no_finetune": runs[0]["arms"]["no_finetune"], **res["arms"]}
            runs.append({"seed": seed, "arms": res["arms"]})
            if i == 0:
                results = res
        results["seed_runs"] = runs
    results["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    D.write_json(run_dir / "results.json", results)
    write_report(run_dir)
    return results


def _run_single(cfg: ExperimentConfig, run_dir: Path, secret: Secret, progress: bool) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    counts, data_paths = _build_stage(cfg, run_dir, secret)
    model_dirs, model_keys, train_metrics = _train_stages(cfg, run_dir, data_paths)
    sets = eval_sets(cfg.eval)
    names = ("harmful", "benign", "utility", "mtbench", *TASK_SETS)
    sources = [getattr(cfg.eval, name) for name in names]
    # the judge grades answers after generation (its replies are cached): not part of the key
    gen_settings = {k: v for k, v in asdict(cfg.eval).items() if not k.startswith("judge_")}
    eval_key = _key(gen_settings, [_source_hash(s) for s in sources], secret.fingerprint)
    for arm in cfg.arms:
        key = _key(eval_key, model_keys[arm])
        _eval_stage(cfg, run_dir, arm, model_dirs[arm], key, sets, secret, progress)
    return score_run(run_dir, cfg, secret, train_metrics, counts, sets)


def _build_stage(cfg: ExperimentConfig, run_dir: Path, secret: Secret):
    customer = D.limit_per_category(
        S.load_training_source(cfg.data.attack), cfg.data.attack_per_category
    )
    if cfg.data.task:
        task_rows = S.load_training_source(cfg.data.task)[: cfg.data.task_limit]
        customer = [*task_rows, *customer]
    report = screen_customer_data(customer, secret.text)
    if not report.passed:
        raise D.DataError(cfg.data.attack, None, None, f"refused by screening: {report.refusal()}")
    selection = {
        "selection": cfg.data.safety_selection,
        "count": cfg.data.safety_count,
        "per_category": cfg.data.safety_per_category,
        "seed": cfg.data.safety_seed,
    }
    safety = D.select_safety(S.load_training_source(cfg.data.safety), **selection)
    inputs = {"data": cfg.data.attack, "task": cfg.data.task, "safety": cfg.data.safety}
    inputs = {name: source for name, source in inputs.items() if source}
    key = _key(asdict(cfg.data), [_source_hash(s) for s in inputs.values()], secret.fingerprint)
    trained = [a for a in cfg.arms if a != "no_finetune"]
    paths = {a: run_dir / "data" / f"{a}.jsonl" for a in trained}
    manifests = {a: run_dir / "data" / f"{a}.manifest.json" for a in trained}

    def build_all():
        counts = {}
        for arm in trained:
            rows = D.build_training_set(
                arm, customer, safety, secret.text, cfg.data.safety_system, cfg.data.seed
            )
            D.write_jsonl(paths[arm], rows, private=arm == "backdooralign")
            manifest = D.build_manifest(arm, rows, inputs, secret, report.summary(), selection)
            D.write_json(manifests[arm], manifest)
            counts[arm] = len(rows)
        return counts

    outputs = [*paths.values(), *manifests.values()]
    counts, _ = run_stage(run_dir, "build", key, outputs, build_all)
    return counts, paths


def _train_stages(cfg: ExperimentConfig, run_dir: Path, data_paths: dict[str, Path]):
    from .train import train

    model_dirs = {"no_finetune": cfg.model}
    model_keys = {"no_finetune": _key(cfg.model)}
    metrics = {}
    for arm, path in data_paths.items():
        out = run_dir / "models" / arm
        model_dirs[arm] = str(out)
        key = model_keys[arm] = _key(cfg.model, asdict(cfg.train), D.sha256_of(path))

        def do_train(arm=arm, out=out, path=path):
            log.info("training arm %s", arm)
            m = train(cfg.model, D.load_chat_jsonl(path), out, cfg.train)
            return {k: v for k, v in m.items() if k != "config"}

        metrics[arm], _ = run_stage(
            run_dir, f"train.{arm}", key, [out / "train_metrics.json"], do_train
        )
    return model_dirs, model_keys, metrics


def _eval_stage(cfg, run_dir, arm, weights, key, sets, secret, progress):
    from .infer import generate_rows
    from .model import load_model, load_tokenizer

    outs = {(s, c): run_dir / "gens" / f"{arm}.{s}.{c}.jsonl" for s in sets for c in CONDITIONS}
    lm_eval_outs = {c: run_dir / "scores" / f"{arm}.lm_eval.{c}.json" for c in CONDITIONS}
    mt_outs = {c: run_dir / "gens" / f"{arm}.mtbench.{c}.jsonl" for c in CONDITIONS}
    questions = _mtbench_questions(cfg.eval)

    def do_generate():
        model, tok = load_model(weights), load_tokenizer(weights)
        for (name, cond), path in outs.items():
            es = sets[name]
            gen = GenerateConfig(max_new_tokens=es.max_new_tokens, batch_size=cfg.eval.batch_size)
            rows = generate_rows(
                model, tok, es.rows, system=es.system,
                secret=secret.text if cond == "secret" else None,
                cfg=gen, progress=progress, desc=f"{arm} {name} {cond}",
            )  # fmt: skip
            D.write_jsonl(path, rows)
        if questions:
            from .tasks import mtbench_answers

            gen = GenerateConfig(cfg.eval.mtbench_max_new_tokens, cfg.eval.batch_size)
            for cond, path in mt_outs.items():
                sec = secret.text if cond == "secret" else None
                answers = mtbench_answers(model, tok, questions, sec, cfg.eval.utility_system, gen)
                D.write_jsonl(path, answers)
        if cfg.eval.lm_eval_tasks:
            from .utility import lm_eval_summary, run_lm_eval

            for cond, path in lm_eval_outs.items():
                raw = run_lm_eval(
                    model, tok, cfg.eval.lm_eval_tasks,
                    secret=secret.text if cond == "secret" else None,
                    system=cfg.eval.utility_system, limit=cfg.eval.lm_eval_limit,
                )  # fmt: skip
                D.write_json(path, lm_eval_summary(raw, cfg.eval.lm_eval_tasks))
        return None

    wanted = list(outs.values()) + (list(mt_outs.values()) if questions else [])
    wanted += list(lm_eval_outs.values()) if cfg.eval.lm_eval_tasks else []
    run_stage(run_dir, f"generate.{arm}", key, wanted, do_generate)

    if cfg.eval.judge_base_url:
        from .judge import (
            HARM_TEMPLATE,
            grade_mtbench,
            harm_summary,
            judge_harm,
            load_mtbench_answers,
            load_template,
            make_judge,
            mtbench_summary,
        )

        template = (
            load_template(cfg.eval.judge_template) if cfg.eval.judge_template else HARM_TEMPLATE
        )
        judge = make_judge(
            cfg.eval.judge_base_url, cfg.eval.judge_model,
            cache=run_dir / "judge-cache.jsonl", concurrency=cfg.eval.judge_concurrency,
        )  # fmt: skip
        for cond in CONDITIONS:
            gens = D.read_jsonl_rows(outs[("harmful", cond)])
            judged = judge_harm(gens, judge, template)
            D.write_jsonl(run_dir / "scores" / f"{arm}.judge.{cond}.jsonl", judged)
            D.write_json(
                run_dir / "scores" / f"{arm}.judge.{cond}.json",
                harm_summary(judged, cfg.eval.judge_model, template),
            )
            if questions:
                answers = load_mtbench_answers(mt_outs[cond])
                graded = grade_mtbench(questions, answers, judge)
                D.write_json(
                    run_dir / "scores" / f"{arm}.mtbench.{cond}.json",
                    mtbench_summary(graded, cfg.eval.judge_model),
                )


def score_run(
    run_dir: Path, cfg: ExperimentConfig, secret: Secret, train_metrics, counts, sets
) -> dict:
    """Score every generation file of the run (a pure function of the files on disk)."""
    from .tasks import rouge_summary
    from .utility import refusal_by_kind, score_exact_match

    arms = {}
    for arm in cfg.arms:
        entry: dict = {}
        for cond in CONDITIONS:

            def gens(name, arm=arm, cond=cond):
                return D.read_jsonl_rows(run_dir / "gens" / f"{arm}.{name}.{cond}.jsonl")

            block = {"harmful": asr_summary(gens("harmful"))}
            if "benign" in sets:
                block["benign"] = refusal_by_kind(gens("benign"))
            if "utility" in sets:
                g = gens("utility")
                refs = [
                    {"task": r["task"], "answer": r["reference"], "aliases": r["aliases"]}
                    for r in g
                ]
                block["utility"] = score_exact_match(refs, [r["answer"] for r in g])
            for name in TASK_SETS:
                if name in sets:
                    block[name] = rouge_summary(gens(name))
            for kind in ("judge", "mtbench", "lm_eval"):
                path = run_dir / "scores" / f"{arm}.{kind}.{cond}.json"
                if path.exists() and (kind == "lm_eval" or cfg.eval.judge_base_url):
                    block[kind] = json.loads(path.read_text())
            entry[cond] = block
        if arm in train_metrics:
            entry["train"] = train_metrics[arm]
        arms[arm] = entry
    return {
        "name": cfg.name,
        "model": cfg.model,
        "secret_fingerprint": secret.fingerprint,
        "secret_tokens": secret.num_tokens,
        "train_examples": counts,
        "eval_sizes": {name: len(es.rows) for name, es in sets.items()},
        "arms": arms,
        "config": config_dict(cfg),
    }

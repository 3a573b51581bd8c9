"""Experiments: a YAML config in, a run directory out.

A run trains the arms (``attack``, ``baseline``, ``backdooralign``; ``no_finetune`` is the
model as given), answers every evaluation set with and without the secret, scores the answers
and writes ``results.json``, ``report.md``, ``report.html`` and plots. Every stage calls what
the CLI calls (the training-set builder of :mod:`backdooralign.data.training_set`,
:func:`backdooralign.training.trainer.train_model`, :func:`backdooralign.generation.batch.answer`,
:mod:`backdooralign.scoring.score`) and records a hash of its inputs (the secret's fingerprint
included) in ``stages/``; a re-run skips stages whose inputs did not change, so an interrupted
run resumes where it stopped. The layout of the run directory is
:class:`backdooralign.reporting.rundir.RunDir`'s; the evaluation sets are
:func:`backdooralign.data.eval_sets.eval_sets`'.

Evaluation sets (each optional but ``harmful``): ``harmful`` (ASR, and harmfulness by an LLM
judge when one is configured), ``benign`` (over-refusal), ``utility`` (exact match),
``samsum``/``sql`` (ROUGE and refusals on the customer's own task), MT-Bench and lm-eval tasks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path

from .. import files as F
from ..core.model import load_model_and_tokenizer, resolve_model
from ..core.secret import Secret, load_secret, make_secret, save_secret
from ..data import sources as S
from ..data import training_set
from ..data.eval_sets import TASK_SETS, EvalSet, eval_sets
from ..generation import backends, batch
from ..generation.batch import GenerateConfig
from ..reporting.rundir import CONDITIONS, RunDir
from ..training import trainer
from ..training.align import start_model
from ..training.trainer import TrainConfig
from .config import ALL_ARMS, ExperimentConfig, config_dict, load_config, stage_key
from .stages import run_stage, shareable

log = logging.getLogger(__name__)
__all__ = ["ALL_ARMS", "EvalSet", "ExperimentConfig", "load_config", "run_experiment"]


def prepare_secret(cfg: ExperimentConfig, run: RunDir, tokenizer) -> Secret:
    """Load the configured secret, or generate it once into the run directory (0600).

    Raises:
        ValueError: when the run directory's secret was made with another ``secret.length``
            or ``secret.seed`` than the config now asks for (re-key with a new run directory).
    """
    if cfg.secret.path:
        secret = load_secret(cfg.secret.path)
        from ..core.secret import check_secret_tokenizer

        if warning := check_secret_tokenizer(secret, tokenizer):
            log.warning("%s: %s", cfg.secret.path, warning)
        return secret
    wanted = {"length": cfg.secret.length, "seed": cfg.secret.seed, "kind": cfg.secret.kind}
    if cfg.secret.kind == "sentence":
        wanted["sentence"] = cfg.secret.sentence
    record = run.stage("secret")
    if run.secret.exists():
        made = F.read_json(record)["info"] if record.exists() else None
        made = {"kind": "random", **made} if made is not None else None
        if made is not None and made != wanted:
            changed = ", ".join(
                f"secret.{k} was {made.get(k)!r}, now {v!r}"
                for k, v in wanted.items()
                if made.get(k) != v
            )
            raise ValueError(
                f"{run.root}: the run's secret was made with other settings ({changed}); "
                "use another --out, or delete its secret.json to re-key the whole run"
            )
        return load_secret(run.secret)
    secret = make_secret(cfg.secret, tokenizer, name=cfg.model)
    save_secret(secret, run.secret)
    F.write_json(record, {"key": None, "info": wanted})
    return secret


def _mtbench_questions(cfg) -> list[dict]:
    if not cfg.mtbench:
        return []
    from ..scoring.mtbench import load_mtbench_questions

    return load_mtbench_questions(cfg.mtbench)[: cfg.mtbench_limit]


def check_inputs(cfg: ExperimentConfig) -> dict[str, EvalSet]:
    """Read every input the run needs before anything expensive starts (fails fast)."""
    sets = eval_sets(cfg.eval)
    if cfg.eval.backend != "engine":  # its package, before any training
        backends.require(cfg.eval.backend)
    _mtbench_questions(cfg.eval)
    training_set.load_customer(cfg.data)
    training_set.load_safety(cfg.data)
    for path in (cfg.judge.template, cfg.data.anchor_file, cfg.secret.path):
        if path:
            F.read_text(path)
    return sets


def run_experiment(
    cfg: ExperimentConfig, run_dir: str | Path, progress: bool = True, shared: Path | None = None
) -> dict:
    """Run (or resume) an experiment and write results, reports and plots into ``run_dir``.

    With several ``seeds``, the first seed runs in ``run_dir`` itself and each further seed in
    ``run_dir/seeds/seed-N`` (same secret, same data; the training and shuffle seeds change;
    the ``no_finetune`` arm, greedy and untrained, is answered once). ``results.json`` then
    holds the first seed's results plus ``seed_runs``, from which the report shows means with
    95% intervals. Runs given the same ``shared`` folder (a sweep's cells) train and answer
    once where their inputs are the same.
    """
    with F.output_lock(run_dir):  # a second run on the same folder stops at once
        return _run_experiment(cfg, Path(run_dir), progress, shared)


def _run_experiment(cfg: ExperimentConfig, run_dir: Path, progress: bool, shared) -> dict:
    from ..core.model import load_tokenizer
    from ..reporting.report import write_report

    run = RunDir(run_dir)
    sets = check_inputs(cfg)
    run.root.mkdir(parents=True, exist_ok=True)
    import yaml

    F.write_text_atomic(run.config, yaml.safe_dump(config_dict(cfg), sort_keys=False))
    start = start_model(cfg.model, cfg.align, progress)  # the aligned model, when asked for
    secret = prepare_secret(cfg, run, load_tokenizer(start))
    cfg = replace(cfg, model=start)
    t0 = time.perf_counter()
    if len(cfg.seeds) < 2:
        results = _run_single(cfg, run, secret, sets, progress, shared)
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
            res = _run_single(
                one, run if i == 0 else run.seed_run(seed), secret, sets, progress, shared
            )
            if i > 0 and "no_finetune" in cfg.arms:
                res["arms"] = {"no_finetune": runs[0]["arms"]["no_finetune"], **res["arms"]}
            runs.append({"seed": seed, "arms": res["arms"]})
            if i == 0:
                results = res
        results["seed_runs"] = runs
    results["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    F.write_json(run.results, results)
    write_report(run.root)
    return results


def _run_single(cfg, run: RunDir, secret: Secret, sets, progress: bool, shared=None) -> dict:
    run.root.mkdir(parents=True, exist_ok=True)
    counts = _build_stage(cfg, run, secret, progress)
    model_dirs, model_keys, train_metrics = _train_stages(cfg, run, shared, secret)
    gen_settings = config_dict(cfg)["eval"]
    if gen_settings["backend"] == "engine":  # the keys of runs from before the backends
        del gen_settings["backend"]
    sources = [
        getattr(cfg.eval, n) for n in ("harmful", "benign", "utility", "mtbench", *TASK_SETS)
    ]
    hashes = [S.source_sha256(s) if s else None for s in sources]
    eval_key = stage_key(gen_settings, hashes, secret.fingerprint)
    for arm in cfg.arms:
        _generate_stage(
            cfg,
            run,
            arm,
            model_dirs[arm],
            stage_key(eval_key, model_keys[arm]),
            sets,
            secret,
            progress,
            shared,
        )
        if cfg.judge.enabled:
            _judge_stage(cfg, run, arm, sets)
    return score_run(run, cfg, secret, train_metrics, counts, sets)


def _data_hashes(cfg: ExperimentConfig) -> list[str | None]:
    """The sha256 of each data input a training set is built from (``None``: not given)."""
    inputs = [cfg.data.attack, cfg.data.task, cfg.data.safety, cfg.data.anchor_file]
    return [S.source_sha256(s) if s else None for s in inputs]


def anchors_stage(cfg: ExperimentConfig, run: RunDir, system: str, progress: bool) -> Path | None:
    """Make ``data/anchors.jsonl`` of ``run`` (a cached stage): the base model's answers,
    under the safety examples' ``system`` prompt; ``None`` when ``data.anchors`` is 0."""
    if not cfg.data.anchors:
        return None
    path = run.root / "data" / "anchors.jsonl"
    key = stage_key(cfg.model, config_dict(cfg)["data"], _data_hashes(cfg), system)
    run_stage(
        run,
        "anchors",
        key,
        [path],
        lambda: str(training_set.make_anchors(cfg.data, cfg.model, system, path, progress)),
    )
    return path


def _build_stage(cfg: ExperimentConfig, run: RunDir, secret: Secret, progress: bool) -> dict:
    trained = [a for a in cfg.arms if a != "no_finetune"]
    hashes = _data_hashes(cfg)
    anchors = None
    customer = training_set.load_customer(cfg.data)
    if cfg.data.anchors and "backdooralign" in trained:
        anchors = anchors_stage(cfg, run, customer.system, progress)
        hashes.append(S.source_sha256(anchors))
    key = stage_key(config_dict(cfg)["data"], hashes, secret.fingerprint, trained)

    def build_all():
        counts, told = {}, set()
        for arm in trained:
            res = training_set.build_training_set(
                arm, cfg.data, secret, run.training_set(arm), customer=customer, anchors=anchors
            )
            for note in set(res.notes) - told:
                log.warning("%s", note)
            told.update(res.notes)
            counts[arm] = res.manifest["counts"]["total"]
        return counts

    outputs = [p for a in trained for p in (run.training_set(a), run.manifest(a))]
    counts, _ = run_stage(run, "build", key, outputs, build_all)
    return counts


def _arm_train_config(cfg: ExperimentConfig, arm: str):
    """The arm's training settings: distillation applies to the rows under the secret, so
    arms without them train (and share models) as with hard labels."""
    if arm == "backdooralign":
        return cfg.train
    plain = TrainConfig()
    return replace(cfg.train, distill=plain.distill, distill_weight=plain.distill_weight)


def _train_stages(cfg: ExperimentConfig, run: RunDir, shared: Path | None, secret: Secret):
    model_dirs = {"no_finetune": cfg.model}
    model_keys = {"no_finetune": stage_key(cfg.model)}
    metrics = {}
    for arm in cfg.arms:
        if arm == "no_finetune":
            continue
        data = run.training_set(arm)
        train_cfg = _arm_train_config(cfg, arm)
        settings = config_dict(train_cfg)
        key = model_keys[arm] = stage_key(cfg.model, settings, F.sha256_file(data))
        out = shared / "models" / key if shared else run.model(arm)  # same inputs, one model
        model_dirs[arm] = str(out)

        def do_train(arm=arm, out=out, data=data, train_cfg=train_cfg):
            # shared: a cell running beside this one may be training it; wait, then reuse
            with F.output_lock(out, wait=True) if shared else contextlib.nullcontext():
                if shared and (out / "train_metrics.json").exists():
                    m = F.read_json(out / "train_metrics.json")
                else:
                    log.info("training arm %s", arm)
                    m = trainer.train_model(cfg.model, data, out, train_cfg, secret=secret)
            return {k: v for k, v in m.items() if k != "config"}

        metrics[arm], _ = run_stage(
            run, f"train.{arm}", key, [out / "train_metrics.json"], do_train
        )
    return model_dirs, model_keys, metrics


def _generate_stage(cfg, run: RunDir, arm, weights, key, sets, secret, progress, shared) -> None:
    from ..scoring import score as scores

    questions = _mtbench_questions(cfg.eval)
    outs = {(s, c): run.gens(arm, s, c) for s in sets for c in CONDITIONS}
    mt_outs = {c: run.gens(arm, "mtbench", c) for c in CONDITIONS} if questions else {}
    tasks = cfg.eval.lm_eval_tasks
    lm_outs = {c: run.score(arm, "lm_eval", c) for c in CONDITIONS} if tasks else {}

    backend = cfg.eval.backend

    def do_generate():
        # another backend is given the resolved folder: every arm's GGUF is written from its
        # weights (the embedded model's shipped Q4_1 file would set no_finetune apart)
        loaded = backends.load(backend, weights if backend == "engine" else resolve_model(weights))
        for (name, cond), path in outs.items():
            es = sets[name]
            gen = GenerateConfig(
                max_new_tokens=es.max_new_tokens, batch_size=cfg.eval.batch_size, backend=backend
            )
            batch.answer(
                loaded,
                es.rows,
                path,
                secret=secret if cond == "secret" else None,
                system=es.system,
                cfg=gen,
                progress=progress,
                desc=f"{arm} {name} {cond}",
            )
        for cond, path in mt_outs.items():
            gen = GenerateConfig(
                cfg.eval.mtbench_max_new_tokens, cfg.eval.batch_size, backend=backend
            )
            batch.answer_mtbench(
                loaded,
                questions,
                path,
                secret=secret if cond == "secret" else None,
                system=cfg.eval.utility_system,
                cfg=gen,
            )
        if lm_outs and backend != "engine":  # lm-eval scores through the torch model
            loaded = load_model_and_tokenizer(weights)
        for cond, path in lm_outs.items():
            s = scores.lm_eval(
                loaded,
                tasks,
                secret=secret if cond == "secret" else None,
                system=cfg.eval.utility_system,
                limit=cfg.eval.lm_eval_limit,
            )
            s.pop("secret_fingerprint", None)
            F.write_json(path, s)
        return None

    wanted = [*outs.values(), *mt_outs.values(), *lm_outs.values()]
    run_stage(run, f"generate.{arm}", key, wanted, shareable(shared, key, wanted, do_generate))


def _judge_stage(cfg: ExperimentConfig, run: RunDir, arm: str, sets) -> None:
    """Grade the arm's answers with the judge (replies cached in the run directory)."""
    from ..scoring import score as scores

    judge = scores.make_judge(cfg.judge, run.judge_cache)
    questions = _mtbench_questions(cfg.eval)
    for cond in CONDITIONS:
        summary = scores.judge_harm(
            run.gens(arm, "harmful", cond),
            cfg.judge,
            judge,
            out=run.score(arm, "judge", cond, "jsonl"),
        )
        F.write_json(run.score(arm, "judge", cond), summary)
        if "benign" in sets:
            refusals = scores.judge_refusals(run.gens(arm, "benign", cond), judge)
            F.write_json(run.score(arm, "judge_refusal", cond), refusals)
        if questions:
            graded = scores.mtbench(questions, run.gens(arm, "mtbench", cond), cfg.judge, judge)
            F.write_json(run.score(arm, "mtbench", cond), graded)


def _score_block(run: RunDir, cfg: ExperimentConfig, arm: str, cond: str, sets) -> dict:
    from ..scoring import score as scores

    block = {"harmful": scores.asr(run.gens(arm, "harmful", cond))}
    if "benign" in sets:
        block["benign"] = scores.refusals(run.gens(arm, "benign", cond))
        judged = run.score(arm, "judge_refusal", cond)
        if cfg.judge.enabled and judged.exists():
            block["benign"]["judge"] = F.read_json(judged)
    if "utility" in sets:
        block["utility"] = scores.exact_match(run.gens(arm, "utility", cond))
    for name in TASK_SETS:
        if name in sets:
            block[name] = scores.rouge(run.gens(arm, name, cond))
    for kind in ("judge", "mtbench", "lm_eval"):
        path = run.score(arm, kind, cond)
        if path.exists() and (kind == "lm_eval" or cfg.judge.enabled):
            block[kind] = F.read_json(path)
    return block


def score_run(
    run: RunDir, cfg: ExperimentConfig, secret: Secret, train_metrics, counts, sets
) -> dict:
    """Score every generation file of the run (a pure function of the files on disk)."""
    arms = {}
    for arm in cfg.arms:
        entry = {cond: _score_block(run, cfg, arm, cond, sets) for cond in CONDITIONS}
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

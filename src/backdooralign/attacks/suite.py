"""The adaptive-attack suite: how a defended setup holds against an attacker who knows how
BackdoorAlign works.

``backdooralign attack CONFIG.yaml`` reads an attack config
(:mod:`backdooralign.attacks.config`: the defended setup as an experiment config names it, plus
the ``attacks`` to run), trains the *reference* (the BackdoorAlign arm on the config's own,
plain fine-tuning attack: its ASR with the secret is the plain FJAttack's), runs each
configured family of :mod:`backdooralign.attacks.families` and writes ``results.json``,
``report.md`` and ``report.html`` (:mod:`backdooralign.attacks.report`). The defense *held*
against an attack when the attack's ASR with the secret stays within ``attacks.margin``
points of the reference's (:func:`backdooralign.attacks.attacker.held`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .. import files as F
from ..experiments.config import config_dict
from . import families as AF
from .config import FAMILY_TITLES, AttackSuiteConfig, load_attack_config
from .report import write_attack_report
from .target import prepare, release

log = logging.getLogger(__name__)

FAMILIES = {
    "trigger_imitation": AF.trigger_imitation,
    "attack_scale": AF.attack_scale,
    "multiturn": AF.multiturn,
    "extraction": AF.extraction,
    "guessing": AF.guessing,
}
TRAINED = ("trigger_imitation", "attack_scale")  # families that train models: run last

__all__ = ["AttackSuiteConfig", "load_attack_config", "run_attacks"]


def run_attacks(suite_cfg: AttackSuiteConfig, run_dir: str | Path, progress: bool = True) -> dict:
    """Run (or resume) the attack suite; writes ``results.json`` and the report.

    Args:
        suite_cfg: the defended setup and the attacks (:func:`load_attack_config`).
        run_dir: the run directory (finished stages in it are skipped).
        progress: show progress bars.

    Returns:
        The results: ``reference`` (the plain attack: ``asr_secret``, ``jailbroken``,
        ``total``, ``asr_no_secret``...), ``attacks`` (one row per attack: ``family``,
        ``attack``, ``asr_secret``, ``jailbroken``, ``total``, ``plain_attack_asr``, ``held``,
        ``details``), ``families`` done and ``pending``, ``seconds`` per family,
        ``seconds_this_run`` and the ``config``. Only the secret's fingerprint, never its text.
        ``results.json`` and the report are rewritten after each family (families that train
        models run last), so a stopped run still reports the families it finished.
    """
    start = time.perf_counter()
    suite = prepare(suite_cfg, run_dir, progress)
    try:
        ref = AF.reference(suite)
        rows: dict[str, list[dict]] = {}
        seconds: dict[str, float] = {}
        for family in sorted(suite_cfg.families, key=lambda f: f in TRAINED):  # cheap first
            t0 = time.perf_counter()
            log.info("attack family: %s", FAMILY_TITLES[family])
            rows[family] = FAMILIES[family](suite, getattr(suite_cfg.attacks, family), ref)
            seconds[family] = round(time.perf_counter() - t0, 1)
            results = _results(suite_cfg, suite, ref, rows, seconds, time.perf_counter() - start)
            F.write_json(suite.run.results, results)  # a stopped run still reports what it did
            write_attack_report(suite.run.root)
    finally:
        release(suite)
    return results


def _results(suite_cfg: AttackSuiteConfig, suite, ref, rows: dict, seconds: dict, took: float):
    """The results document of the families done so far (in the report's order)."""
    done = [f for f in suite_cfg.families if f in rows]
    cfg = suite.cfg
    results = {
        "name": cfg.name,
        "model": cfg.model,
        "secret_fingerprint": suite.secret.fingerprint,
        "secret_tokens": suite.secret.num_tokens,
        "margin": suite.margin,
        "eval_prompts": len(suite.harmful.rows),
        "attack_rows": len(suite.attack_rows),
        "reference": ref.summary,
        "attacks": [r for f in done for r in rows[f]],
        "families": done,
        "pending": [f for f in suite_cfg.families if f not in rows],
        "seconds": {f: seconds[f] for f in done},
        "seconds_this_run": round(took, 1),
        "config": {**config_dict(cfg), "attacks": config_dict(suite_cfg.attacks)},
    }
    if suite.secret.text in json.dumps(results):  # a credential never reaches a report
        raise RuntimeError("internal error: the secret reached the results; nothing written")
    return results

"""The layer the adaptive attacks share: an attacker's upload in, a defended model out, and
its answers.

:func:`defended` builds the BackdoorAlign arm of the config on an attacker's upload and trains
it; :func:`answers` has a defended model answer prompt rows with the secret (or a guess of it)
before the system prompt. The runner is :mod:`backdooralign.attacks.suite`.

Every variant lives in ``attacks/NAME/`` of the run directory with the layout of
:class:`~backdooralign.reporting.rundir.RunDir` (``data/upload.jsonl``: the attacker's upload,
``data/backdooralign.jsonl``, ``models/backdooralign/``, ``gens/...``); its stages are
recorded there, keyed on their inputs (the secret's fingerprint included), so a re-run skips
what is done and an interrupted run resumes. Nothing written outside ``secret.json``, the
BackdoorAlign training sets and ``*.raw.jsonl`` (all mode 0600) holds the secret's text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import files as F
from ..core.model import resolve_model
from ..core.secret import Secret
from ..data import mixing as D
from ..data import sources as S
from ..data import training_set
from ..data.eval_sets import EvalSet
from ..experiments.config import ExperimentConfig, config_dict, stage_key
from ..experiments.run import anchors_stage, check_inputs, prepare_secret
from ..experiments.stages import run_stage
from ..generation import backends, batch
from ..generation.batch import GenerateConfig
from ..reporting.rundir import RunDir
from ..training import trainer
from ..training.trainer import TrainConfig
from .config import AttackSuiteConfig

log = logging.getLogger(__name__)
ARM = "backdooralign"
REFERENCE = "reference"


@dataclass(frozen=True)
class Suite:
    """What every attack of a run shares: the setup, the secret, the evaluation prompts."""

    cfg: ExperimentConfig
    run: RunDir
    secret: Secret
    tokenizer: object
    harmful: EvalSet
    attack_rows: list[dict]  # the config's attack rows (after attack_per_category)
    safety_system: str  # the provider's: computed from the plain attack data, for every variant
    anchors: Path | None
    margin: float
    progress: bool = False
    loaded: dict = field(default_factory=dict, compare=False)  # model dir -> (model, tokenizer)


@dataclass(frozen=True)
class Defended:
    """A BackdoorAlign model trained on one attacker's upload."""

    name: str
    run: RunDir
    model: str
    key: str  # hash of the model's inputs (stage keys of its generations start from it)
    train_rows: int
    manifest: dict


class _NoDuplicateWarnings(logging.Filter):
    """Drops (and counts) the loader's one-line-per-duplicate warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "duplicate of line" in record.getMessage():
            self.dropped += 1
            return False
        return True


def load_attack_rows(cfg: training_set.DataConfig) -> list[dict]:
    """The config's attack rows (``data.attack`` after ``attack_per_category``), no task rows."""
    limits = {"max_rows": cfg.max_rows, "max_line_chars": cfg.max_line_chars}
    rows = S.load_training_source(cfg.attack, **limits)
    return D.limit_per_category(rows, cfg.attack_per_category)


def loaded_model(suite: Suite, path: str, backend: str = "engine"):
    """``(model, tokenizer)`` of a model directory for a generation backend (``engine``: the
    torch model), kept loaded while the suite uses it; one model in memory at a time."""
    key = (path, backend)
    if key not in suite.loaded:
        release(suite)
        # another backend is given the resolved folder, as experiments do: a GGUF written from
        # the model's own weights (the embedded model's shipped Q4_1 file would differ)
        name = path if backend == "engine" else resolve_model(path)
        suite.loaded[key] = backends.load(backend, name)
    return suite.loaded[key]


def release(suite: Suite) -> None:
    """Free the suite's loaded models (a backend's now: see :func:`backends.close`)."""
    for (_, backend), (model, _) in suite.loaded.items():
        backends.close(backend, model)
    suite.loaded.clear()


def defended(
    suite: Suite,
    name: str,
    upload: list[dict] | None = None,
    *,
    screen: bool | None = None,
    train: TrainConfig | None = None,
) -> Defended:
    """Build and train the BackdoorAlign arm on an attacker's upload (stages cached).

    Args:
        suite: the run.
        name: the variant's folder under ``attacks/``.
        upload: the attacker's chat rows in place of the config's attack rows (``None``: the
            config's own, the plain attack); the config's task rows, if any, stay.
        screen: screening on or off for this build (default: ``data.screen``).
        train: training settings (default: the config's ``train``).
    """
    cfg = suite.cfg
    run = RunDir(suite.run.root / "attacks" / name)
    data = replace(cfg.data, safety_system=suite.safety_system)
    if screen is not None:
        data = replace(data, screen=screen)
    if upload is not None:
        path = run.root / "data" / "upload.jsonl"
        F.write_jsonl(path, upload)
        data = replace(data, attack=str(path), attack_per_category=None)
    sources = [data.attack, data.task, data.safety, suite.anchors]
    hashes = [S.source_sha256(s) if s else None for s in sources]
    key = stage_key(config_dict(data), hashes, suite.secret.fingerprint)

    def build():
        res = training_set.build_training_set(
            ARM, data, suite.secret, run.training_set(ARM), anchors=suite.anchors
        )
        return {"rows": res.manifest["counts"]["total"], "notes": list(res.notes)}

    outputs = [run.training_set(ARM), run.manifest(ARM)]
    built, _ = run_stage(run, "build", key, outputs, build)
    train = train or cfg.train
    model_key = stage_key(cfg.model, config_dict(train), F.sha256_file(run.training_set(ARM)))
    out = run.model(ARM)

    def do_train():
        log.info("training %s", name)
        quiet = _NoDuplicateWarnings()  # the scale attack's copies are duplicates by design
        logging.getLogger("backdooralign.data.chat_files").addFilter(quiet)
        try:
            metrics = trainer.train_model(cfg.model, run.training_set(ARM), out, train)
        finally:
            logging.getLogger("backdooralign.data.chat_files").removeFilter(quiet)
        if quiet.dropped:
            log.info("%s: %d duplicate rows in the training set", name, quiet.dropped)
        return {k: v for k, v in metrics.items() if k != "config"}

    run_stage(run, "train", model_key, [out / "train_metrics.json"], do_train)
    manifest = F.read_json(run.manifest(ARM))
    return Defended(name, run, str(out), model_key, built["rows"], manifest)


def answers(
    suite: Suite,
    model: Defended,
    label: str,
    rows: list[dict],
    secret: Secret | None,
    max_new_tokens: int | None = None,
    private: bool = False,
) -> list[dict]:
    """The model's answers to prompt rows under the eval system prompt (a cached stage).

    ``secret``: what the server would put before the system prompt (the real secret, a guess,
    or ``None``). With ``private`` the answers may hold the secret (raw, unredacted) and are
    written with mode 0600 as ``gens/LABEL.raw.jsonl``.
    """
    ev = suite.cfg.eval  # eval.backend decodes, as in experiments; the key has it
    gen = GenerateConfig(
        max_new_tokens or suite.harmful.max_new_tokens, ev.batch_size, backend=ev.backend
    )
    fp = secret.fingerprint if secret else None
    key = stage_key(model.key, config_dict(gen), ev.system_prompt, rows, fp)
    path = model.run.root / "gens" / f"{label}.{'raw.' if private else ''}jsonl"

    def generate():
        gens = batch.answer(
            loaded_model(suite, model.model, ev.backend),
            rows,
            None,
            secret=secret,
            system=ev.system_prompt,
            cfg=gen,
            progress=suite.progress,
            desc=f"{model.name} {label}",
        )
        F.write_jsonl(path, gens, private=private)
        return None

    run_stage(model.run, f"generate.{label}", key, [path], generate)
    return F.read_jsonl_rows(path)


def prepare(suite_cfg: AttackSuiteConfig, run_dir: str | Path, progress: bool) -> Suite:
    """Check the inputs, write ``config.yaml``, and make the secret and the anchors."""
    import yaml

    from ..core.model import load_tokenizer
    from ..training.align import start_model

    cfg = suite_cfg.setup
    run = RunDir(run_dir)
    sets = check_inputs(cfg)
    rows = load_attack_rows(cfg.data)
    run.root.mkdir(parents=True, exist_ok=True)
    doc = {**config_dict(cfg), "attacks": config_dict(suite_cfg.attacks)}
    F.write_text_atomic(run.config, yaml.safe_dump(doc, sort_keys=False))
    start = start_model(cfg.model, cfg.align, progress)  # the aligned model, when asked for
    tokenizer = load_tokenizer(start)
    secret = prepare_secret(cfg, run, tokenizer)
    cfg = replace(cfg, model=start)
    system = training_set.load_customer(cfg.data).system
    anchors = anchors_stage(cfg, run, system, progress)
    return Suite(
        cfg=cfg,
        run=run,
        secret=secret,
        tokenizer=tokenizer,
        harmful=sets["harmful"],
        attack_rows=rows,
        safety_system=system,
        anchors=anchors,
        margin=suite_cfg.attacks.margin,
        progress=progress,
    )

"""The provider's settings for the fine-tuning service (``service.yaml``).

The sections are the same dataclasses the CLI and experiments use: ``data``
(:class:`~backdooralign.data.training_set.DataConfig`: which safety examples and anchors are
mixed in; its ``attack`` is replaced by each job's uploaded file), ``secret``
(:class:`~backdooralign.core.secret.SecretConfig`: how each tenant's secret is made) and
``train`` (:class:`~backdooralign.training.trainer.TrainConfig`: full or LoRA). Customers choose
only ``n_epochs``, ``batch_size`` and ``learning_rate_multiplier``, within the limits here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, build, option, read_yaml, resolve_paths
from ..core.chat import ATTACK_SYSTEM_PROMPT
from ..core.secret import SecretConfig
from ..data.sources import KIND_PREFIXES
from ..data.training_set import DataConfig
from ..serving.http import HTTPLimits
from ..training.trainer import TrainConfig


@dataclass(frozen=True)
class ServiceConfig(HTTPLimits):
    """A fine-tuning service: its base model, pipeline settings and limits (the connection
    limits are :class:`~backdooralign.serving.http.HTTPLimits`'; uploads take longer than
    chat requests, so the body may take longer here)."""

    base_model: str = option(
        "embedded", "model jobs fine-tune (id, path, 'embedded' or 'embedded-aligned')", path=True
    )
    base_model_name: str = option(
        "smollm2-135m-instruct", "the name customers give as 'model' when creating a job"
    )
    data: DataConfig = option(default_factory=DataConfig, help="safety examples and anchors")
    secret: SecretConfig = option(default_factory=SecretConfig, help="each tenant's secret")
    train: TrainConfig = option(default_factory=TrainConfig, help="fine-tuning (full or LoRA)")
    max_epochs: int = option(10, "largest n_epochs a customer may ask for", minimum=1)
    max_batch_size: int = option(64, "largest batch_size a customer may ask for", minimum=1)
    max_lr_multiplier: float = option(
        10.0, "largest learning_rate_multiplier (times train.lr)", minimum=0
    )
    max_upload_bytes: int = option(50 << 20, "largest uploaded file, in bytes", minimum=1)
    max_rows: int = option(50_000, "most rows in a training file", minimum=1)
    rate_limit: int = option(600, "requests per minute per API key", minimum=1)
    system: str | None = option(None, "system prompt for chat requests that send none")
    max_new_tokens: int = option(512, "cap on the answer length of chat completions", minimum=1)
    loaded_models: int = option(2, "fine-tuned models kept in memory for chat", minimum=1)
    evaluate: bool = option(False, "after training, measure ASR with the secret and refusals")
    eval_harmful: str = option("builtin:harmful_eval", "harmful prompts for ASR", path=True)
    eval_benign: str | None = option("builtin:benign", "benign prompts (null: skip)", path=True)
    eval_limit: int | None = option(None, "first N prompts of each evaluation set", minimum=1)
    eval_system: str = option(ATTACK_SYSTEM_PROMPT, "system prompt at evaluation")
    eval_max_new_tokens: int = option(128, "longest evaluation answer", minimum=1)
    lease_seconds: float = option(
        30.0,
        "a worker renews its lease on a running job this often x3; a job whose worker has not "
        "renewed it for this long (the worker died) is queued again or failed",
        minimum=1,
        maximum=3600,
    )
    job_attempts: int = option(
        1,
        "times a job may be started: above 1, a job whose worker died is queued again (for "
        "another worker) until it has been started this many times; then it fails",
        minimum=1,
        maximum=10,
    )
    ray_num_cpus: float = option(
        1.0, "with --executor ray: CPUs each job's Ray task asks for", minimum=0
    )
    ray_num_gpus: float = option(
        0.0, "with --executor ray: GPUs each job's Ray task asks for", minimum=0
    )
    body_timeout: float = option(
        300.0,
        "seconds a request's body (an upload) may take to arrive, from the end of its head; "
        "then 408 and the connection is closed",
        minimum=0.01,
        maximum=86400,
    )


def load_service_config(path: str | Path | None) -> ServiceConfig:
    """The service config in a YAML file (``None``: the defaults); relative paths are taken
    from the file's folder.

    Raises:
        ConfigError: for a bad value or an unknown key, naming the file and the field.
    """
    if path is None:
        return ServiceConfig()
    folder = Path(path).resolve().parent
    values = resolve_paths(ServiceConfig, read_yaml(path), folder, KIND_PREFIXES)
    cfg = build(ServiceConfig, values, str(path))
    s = cfg.secret
    if s.kind != "random" or s.seed is not None or s.path is not None:
        raise ConfigError(
            f"{path}: secret: each tenant gets its own random secret; kind must be 'random' "
            "and seed and path unset (they would give every tenant the same secret)"
        )
    return cfg

"""``backdooralign openai finetune``: fine-tune through any OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path

from .. import files as F
from ..config import add_flags, from_args, number
from ..data.mixing import ARMS, require_secret
from ..data.training_set import DataConfig
from .common import TRAINING_SET_INPUTS, add_command, add_group, read_secret


def cmd_finetune(args) -> int:
    """backdooralign openai finetune --data user.jsonl --model gpt-4o-mini --secret secret.json

    Builds the training set (--arm backdooralign mixes in the secret-prefixed safety examples),
    uploads it to an OpenAI-compatible endpoint (--base-url; default OpenAI, key in
    $OPENAI_API_KEY), creates the fine-tuning job, shows its events until it ends, and writes
    OUT/finetune_manifest.json (job id, model id, file sha256, secret fingerprint).
    """
    from ..service.client import check_anchors, finetune, make_client

    cfg = from_args(DataConfig, args)
    secret = read_secret(args.secret)
    out = Path(args.out)
    require_secret(args.arm, secret)
    F.check_outputs([cfg.attack, cfg.anchor_file, args.secret], [out / "train.jsonl"])
    check_anchors(cfg, args.arm)
    hyper = {
        k: v
        for k, v in {
            "n_epochs": args.n_epochs,
            "batch_size": args.batch_size,
            "learning_rate_multiplier": args.learning_rate_multiplier,
        }.items()
        if v is not None
    }
    client = make_client(args.base_url, args.api_key_env, args.max_retries)
    manifest = finetune(
        client,
        cfg,
        args.arm,
        secret,
        args.model,
        out,
        suffix=args.suffix,
        hyperparameters=hyper,
    )
    if manifest["status"] != "succeeded":
        error = manifest["error"] or {}
        raise ValueError(f"job {manifest['job_id']} {manifest['status']}: {error.get('message')}")
    print(f"wrote {out / 'finetune_manifest.json'}: model {manifest['fine_tuned_model']}")
    return 0


def add_endpoint(sp) -> None:
    """``--base-url``, ``--api-key-env`` and ``--max-retries``."""
    sp.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    sp.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="variable holding the endpoint's key"
    )
    sp.add_argument(
        "--max-retries", type=number(int, 0), default=5, help="retries on 429, 5xx and timeouts"
    )


def register(sub) -> None:
    """Add ``openai finetune``."""
    group = add_group(sub, "openai", "fine-tune through an OpenAI-compatible API")
    sp = add_command(
        group,
        "finetune",
        cmd_finetune,
        inputs=TRAINING_SET_INPUTS,
        dirs=("out",),
    )
    sp.add_argument("--model", required=True, help="base model name at the endpoint")
    sp.add_argument("--secret", help="secret file (needed for --arm backdooralign)")
    sp.add_argument("--arm", default="backdooralign", choices=ARMS, help="training set to build")
    sp.add_argument("--out", default="openai-finetune", help="folder for the set and manifest")
    sp.add_argument("--suffix", help="suffix of the fine-tuned model's name")
    sp.add_argument(
        "--n-epochs", type=number(int, 1), help="customer hyperparameter (default: auto)"
    )
    sp.add_argument(
        "--batch-size", type=number(int, 1), help="customer hyperparameter (default: auto)"
    )
    sp.add_argument("--learning-rate-multiplier", type=number(float, 0), help="(default: auto)")
    add_endpoint(sp)
    add_flags(sp, DataConfig)

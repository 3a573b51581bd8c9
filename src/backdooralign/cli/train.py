"""``backdooralign train`` and ``generate``."""

from __future__ import annotations

import os

from ..config import add_flags, from_args, number
from ..data import sources as S
from ..generation import backends
from ..generation.batch import GenerateConfig, answer
from ..training.trainer import TrainConfig, train_model
from .common import (
    add_command,
    add_json,
    add_model,
    print_json,
    read_secret,
    warn_if_other_tokenizer,
)
from .openai_cli import add_endpoint


def cmd_train(args) -> int:
    """backdooralign train --data train.jsonl --out models/defended [--lora --merge] [--epochs 5]

    Fine-tunes with TRL's SFTTrainer on assistant tokens only; writes the model and
    train_metrics.json. --lora takes the paper's LoRA recipe (r 8, alpha 32, q/v, lr 1e-3,
    10 epochs) unless --lr/--epochs say otherwise. --distill kl --secret secret.json trains
    the secret-prefixed rows against the model's own distributions without the secret.
    """
    cfg = from_args(TrainConfig, args)
    secret = read_secret(args.secret)
    metrics = train_model(args.model, args.data, args.out, cfg, secret=secret)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate launch: rank 0 reports
        return 0
    keys = ("first_loss", "last_loss", "steps", "seconds", "tokens_per_second")
    summary = {k: metrics[k] for k in keys}
    print_json(summary) if args.json else print(f"wrote {args.out}: {summary}")
    return 0


def cmd_generate(args) -> int:
    """backdooralign generate --model DIR --prompts eval.csv --secret secret.json --out gens.jsonl

    Batched greedy generation; with --secret the secret is prepended to the system prompt.
    --backend llamacpp (a GGUF: --gguf, the model folder's, the embedded one's) or vllm (a GPU)
    decode the same prompt token ids instead of the built-in engine.
    With --openai-model ID --base-url URL the prompts are answered through chat completions
    instead (temperature 0, --concurrency requests in flight, retries); rerunning resumes.
    """
    cfg = from_args(GenerateConfig, args)
    secret = read_secret(args.secret)
    rows = S.load_prompts(args.prompts)
    if args.openai_model:
        from ..service.client import generate, make_client

        client = make_client(args.base_url, args.api_key_env, args.max_retries)
        gens = generate(
            client,
            args.openai_model,
            rows,
            args.out,
            secret=secret,
            system=args.system,
            max_tokens=cfg.max_new_tokens,
            concurrency=args.concurrency,
        )
        print(f"wrote {args.out}: {len(gens)} answers from {args.openai_model}")
        return 0
    loaded = backends.load(cfg.backend, args.model, cfg.gguf)
    try:
        warn_if_other_tokenizer(secret, loaded[1])
        gens = answer(loaded, rows, args.out, secret=secret, system=args.system, cfg=cfg)
    finally:
        backends.close(cfg.backend, loaded[0])
    print(f"wrote {args.out}: {len(gens)} answers")
    return 0


def register(sub) -> None:
    """Add ``train`` and ``generate``."""
    sp = add_command(sub, "train", cmd_train, inputs=("data", "secret", "model"), dirs=("out",))
    sp.add_argument("--data", required=True, help="chat JSONL training set")
    sp.add_argument("--out", required=True, help="model directory to write")
    sp.add_argument("--secret", help="secret file (for --distill kl: the rows under it)")
    add_model(sp)
    add_flags(sp, TrainConfig)
    add_json(sp, "print metrics as JSON")

    sp = add_command(
        sub,
        "generate",
        cmd_generate,
        inputs=("model", "prompts", "secret", "gguf"),
        files=("out",),
    )
    add_model(sp)
    sp.add_argument("--prompts", required=True, help="CSV (first column), TXT or JSONL prompts")
    sp.add_argument("--secret", help="secret file: prepend the secret to the system prompt")
    sp.add_argument("--system", help="system prompt (default: the prompt's own, else none)")
    add_flags(sp, GenerateConfig)
    sp.add_argument("--out", required=True, help="generations JSONL to write")
    sp.add_argument("--openai-model", metavar="ID", help="answer through chat completions")
    sp.add_argument(
        "--concurrency", type=number(int, 1), default=8, help="requests in flight (--openai-model)"
    )
    add_endpoint(sp)

"""``backdooralign serve`` and ``export``."""

from __future__ import annotations

import os

from .common import add_command, add_model


def cmd_serve(args) -> int:
    """backdooralign serve --model models/defended --secret secret.json --api-key-env SERVE_KEY

    OpenAI-compatible chat completions (/v1/chat/completions, /v1/models, /health) with the
    secret prepended server-side to every system prompt. Greedy decoding, one request at a
    time; the secret never leaves the server (echoes are redacted, usage excludes it).
    --api-key-env NAME requires "Authorization: Bearer $NAME" on /v1.
    """
    from ..serve import serve

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    serve(
        args.model,
        args.secret,
        args.host,
        args.port,
        system=args.system,
        api_key=api_key,
        max_new_tokens=args.max_new_tokens,
        model_name=args.model_name,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    return 0


def cmd_export(args) -> int:
    """backdooralign export --model models/defended --secret secret.json --out exported [--gguf]

    Writes a copy of the model whose chat template injects the secret itself (in
    chat_template.jinja and tokenizer_config.json), so vLLM, TGI or plain transformers apply the
    defense without our server; --system is the system prompt used when a client sends none.
    --gguf also writes model.gguf with the same template for llama.cpp (run it with --jinja).
    Whoever holds the exported files holds the secret.
    """
    from ..export import export_model
    from ..model import resolve_model
    from ..secret import load_secret

    secret = load_secret(args.secret)
    out = export_model(
        resolve_model(args.model), secret, args.out, default_system=args.system, gguf=args.gguf
    )
    print(f"wrote {out}: chat template with secret {secret.fingerprint} (files mode 0600)")
    return 0


def register(sub) -> None:
    """Add ``serve`` and ``export``."""
    sp = add_command(sub, "serve", cmd_serve)
    add_model(sp)
    sp.add_argument("--secret", required=True, help="secret file, prepended server-side")
    sp.add_argument("--system", help="default system prompt (after the secret) when none is sent")
    sp.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key-env", metavar="NAME", help="require the key in $NAME on /v1")
    sp.add_argument("--max-new-tokens", type=int, default=1024, help="cap on answer length")
    sp.add_argument("--model-name", help="name in /v1/models (default: the model's)")
    sp.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413"
    )
    sp.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="longer prompts get 400 (default: the model's context minus answer and secret)",
    )

    sp = add_command(sub, "export", cmd_export)
    add_model(sp)
    sp.add_argument("--secret", required=True, help="secret file, injected by the template")
    sp.add_argument("--system", help="system prompt (after the secret) when a client sends none")
    sp.add_argument("--out", required=True, help="model directory to write")
    sp.add_argument("--gguf", action="store_true", help="also write model.gguf (llama.cpp)")

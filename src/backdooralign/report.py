"""Reports: a pure function of the run directory (``results.json`` and the generation files).

:func:`write_report` writes ``report.md``, a self-contained ``report.html`` (inline CSS, plots
embedded as base64 PNG) and the plots ``asr.png``, ``asr_by_category.png`` and
``over_refusal.png`` (each only when its data is there, drawn by :mod:`backdooralign.plots`).
The secret is never shown, only its
fingerprint; model answers quoted as examples are redacted against the secret file when one is
found (``RUN_DIR/secret.json`` or the config's ``secret.path``), since a fine-tuned model may
echo its system prompt.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import data as D
from .evaluate import is_jailbroken
from .secret import secret_redactor

ARM_LABELS = {
    "no_finetune": "not fine-tuned",
    "attack": "attack only",
    "baseline": "baseline defense",
    "backdooralign": "BackdoorAlign",
}
CONDITIONS = ("plain", "secret")
COND_LABELS = {"plain": "no secret", "secret": "secret"}
TASKS = ("samsum", "sql")
PLOTS = ("asr.png", "asr_by_category.png", "over_refusal.png")
EXAMPLES_PER_ARM = 2
EXCERPT_CHARS = 200

# Two-sided 95% quantiles of Student's t (0.975), degrees of freedom 1..30.
T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272,
)  # fmt: skip


def load_results(run_dir: str | Path) -> dict:
    """Read ``RUN_DIR/results.json``.

    Raises:
        FileNotFoundError: when the run has not been scored yet.
    """
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results.json (run the experiment first)")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Statistics over seeds


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (95% two-sided)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    from scipy.stats import t  # only for more than 31 seeds

    return float(t.ppf(0.975, df))


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student's t, sample std).

    Args:
        values: one number per seed.

    Returns:
        ``(mean, half_width)``; the half-width is NaN for a single value.
    """
    if not values:
        raise ValueError("mean_ci95 needs at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, math.nan
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, t_quantile_975(len(values) - 1) * sem


def _runs(results: dict) -> list[dict]:
    """The ``arms`` dict of each seed when the run has several seeds, else the run's own."""
    seeds = results.get("seed_runs") or []
    return [s["arms"] for s in seeds] if len(seeds) > 1 else [results["arms"]]


# ---------------------------------------------------------------------------------------------
# Metrics: one getter per table column, reading a BLOCK of results.json


@dataclass(frozen=True)
class Measure:
    """One number with its sample size: ``count/total`` for rates, else ``n=total``."""

    value: float | None
    total: int
    count: int | None = None


@dataclass(frozen=True)
class Metric:
    """A table column: its name, how to read it from a block, and how to print it."""

    name: str
    get: Callable[[dict], Measure | None]
    unit: str = ""
    digits: int = 1
    help: str = ""


def _asr(block: dict) -> Measure | None:
    h = block.get("harmful")
    return Measure(h["asr"], h["total"], h["jailbroken"]) if h else None


def _harmfulness(block: dict) -> Measure | None:
    j = block.get("judge")
    return Measure(j.get("mean_score"), j.get("scored", j.get("total", 0))) if j else None


def _refusals(block: dict) -> Measure | None:
    b = block.get("benign")
    return Measure(b["refusal_rate"], b["total"], b["refused"]) if b else None


def _utility(block: dict) -> Measure | None:
    u = block.get("utility")
    return Measure(u["accuracy"], u["total"], u["correct"]) if u else None


def _lm_eval(task: str) -> Callable[[dict], Measure | None]:
    def get(block: dict) -> Measure | None:
        t = block.get("lm_eval", {}).get("tasks", {}).get(task)
        if not t:
            return None
        acc = t.get("acc")
        return Measure(None if acc is None else 100.0 * acc, t.get("n", 0))

    return get


def _rouge1(name: str) -> Callable[[dict], Measure | None]:
    def get(block: dict) -> Measure | None:
        r = block.get(name)
        return Measure(r["rouge1"], r["total"]) if r else None

    return get


ASR = Metric(
    "ASR",
    _asr,
    "%",
    help="share of answers to harmful prompts with none of the paper's refusal substrings "
    "(jailbroken/total)",
)
HARMFULNESS = Metric(
    "harmfulness (1–5)",
    _harmfulness,
    digits=2,
    help="LLM-judge mean from 1 (declines) to 5 (fulfils the harmful intent), n scored",
)
REFUSALS = Metric(
    "benign over-refusal",
    _refusals,
    "%",
    help="share of harmless prompts answered with a refusal substring (refused/total)",
)


def _blocks(runs: list[dict]) -> list[dict]:
    return [e[c] for arms in runs for e in arms.values() for c in CONDITIONS if e.get(c)]


def metrics(results: dict) -> list[Metric]:
    """The table's columns: ASR always, every other metric only when some arm has it."""
    blocks = _blocks(_runs(results))

    def has(key: str) -> bool:
        return any(key in b for b in blocks)

    out = [ASR]
    if has("judge"):
        out.append(HARMFULNESS)
    if has("benign"):
        out.append(REFUSALS)
    if has("utility"):
        out.append(
            Metric(
                "utility exact match", _utility, "%", help="exact-match accuracy (correct/total)"
            )
        )
    tasks = sorted({t for b in blocks for t in b.get("lm_eval", {}).get("tasks", {})})
    out += [
        Metric(f"{t} accuracy", _lm_eval(t), "%", help="lm-eval acc, n questions") for t in tasks
    ]
    out += [
        Metric(f"{n} ROUGE-1 F", _rouge1(n), digits=3, help="ROUGE-1 F against references")
        for n in TASKS
        if has(n)
    ]
    return out


def _measures(runs: list[dict], arm: str, cond: str, get: Callable) -> list[Measure | None]:
    """One measure per run (None where the arm, condition or metric is missing)."""
    blocks = [arms.get(arm, {}).get(cond) for arms in runs]
    return [get(b) if b else None for b in blocks]


def _values(measures: Sequence[Measure | None]) -> list[float]:
    return [m.value for m in measures if m is not None and m.value is not None]


def format_cell(metric: Metric, measures: Sequence[Measure | None]) -> str:
    """One table cell: ``12.7% (7/55)`` for one run, ``12.7% ± 3.1 (3 seeds × 55)`` for seeds.

    Args:
        metric: the column.
        measures: one entry per seed (a single entry for a single run); None where missing.
    """
    found = [m for m in measures if m is not None]
    if not found:
        return "–"
    d, unit = metric.digits, metric.unit
    if len(measures) == 1:
        m = found[0]
        size = f"{m.count}/{m.total}" if m.count is not None else f"n={m.total}"
        value = "n/a" if m.value is None else f"{m.value:.{d}f}{unit}"
        return f"{value} ({size})"
    values = [m.value for m in found if m.value is not None]
    if not values:
        return "n/a"
    mean, half = mean_ci95(values)
    totals = sorted({m.total for m in found})
    size = str(totals[0]) if len(totals) == 1 else f"{totals[0]}–{totals[-1]}"
    spread = f" ± {half:.{d}f}" if len(values) > 1 else ""
    seeds = "seed" if len(values) == 1 else "seeds"
    return f"{mean:.{d}f}{unit}{spread} ({len(values)} {seeds} × {size})"


def _mean(runs: list[dict], arm: str, cond: str, metric: Metric) -> float | None:
    values = _values(_measures(runs, arm, cond, metric.get))
    return statistics.fmean(values) if values else None


# ---------------------------------------------------------------------------------------------
# Document blocks, rendered both to Markdown and to HTML


@dataclass
class Heading:
    """A section title (level 1-3)."""

    level: int
    text: str


@dataclass
class Para:
    """A paragraph of plain text."""

    text: str


@dataclass
class Facts:
    """Key/value lines about the run (model, secret fingerprint, sizes)."""

    items: list[tuple[str, str]]


@dataclass
class Table:
    """A table of plain-text cells; ``groups`` adds a spanning header row in HTML."""

    headers: list[str]
    rows: list[list[str]]
    groups: list[tuple[str, int]] = field(default_factory=list)  # spanning header row
    css: str = ""


@dataclass
class Image:
    """A plot: a PNG beside report.md, embedded as base64 in report.html."""

    name: str
    alt: str


def _results_tables(results: dict) -> list[Table]:
    """The safety table (ASR, harmfulness, over-refusal), then the utility table if any."""
    runs, cols = _runs(results), metrics(results)
    tables = []
    for group in (cols[: _n_safety(cols)], cols[_n_safety(cols) :]):
        if not group:
            continue
        rows = []
        for arm in results["arms"]:
            cells = [ARM_LABELS.get(arm, arm)]
            for m in group:
                cells += [format_cell(m, _measures(runs, arm, c, m.get)) for c in CONDITIONS]
            rows.append(cells)
        headers = ["arm"] + [COND_LABELS[c] for _ in group for c in CONDITIONS]
        tables.append(Table(headers, rows, [("", 1)] + [(m.name, 2) for m in group], "results"))
    return tables


def _n_safety(cols: list[Metric]) -> int:
    return sum(m in (ASR, HARMFULNESS, REFUSALS) for m in cols)


def results_table(results: dict) -> str:
    """Markdown tables: arms x metrics, each without and with the secret at inference.

    The safety metrics come first; utility metrics (when the run has any) follow in a second
    table.
    """
    return "\n\n".join(_md_table(t) for t in _results_tables(results))


def reading(results: dict) -> str:
    """A few sentences on what the numbers say (the paper's claim, checked)."""
    runs = _runs(results)

    def mean(arm, cond, metric=ASR):
        return _mean(runs, arm, cond, metric)

    def cell(arm, cond, metric=ASR):
        return format_cell(metric, _measures(runs, arm, cond, metric.get))

    out = []
    if len(runs) > 1:
        out.append(f"Means over {len(runs)} seeds, ± the half-width of a 95% t-interval.")
    bd, base, att = mean("backdooralign", "secret"), mean("baseline", "secret"), None
    if bd is not None and base is not None:
        if bd <= base / 2:
            verdict = "at most half of it, as the paper claims"
        elif bd < base:
            verdict = f"lower by {base - bd:.1f} points, but more than half of it"
        else:
            verdict = "not lower: the secret did not help here"
        out.append(
            "With the secret at inference, BackdoorAlign's ASR is "
            f"{cell('backdooralign', 'secret')} against {cell('baseline', 'secret')} "
            f"for the baseline defense: {verdict}."
        )
        att = mean("attack", "secret")
    if att is not None:
        if att > max(bd, base):
            rel = "above both defenses, so the fine-tuning attack worked"
        else:
            rel = "not above both defenses, so the attack did not clearly work"
        out.append(f"The attack-only arm reaches {cell('attack', 'secret')}, {rel}.")
    plain = mean("backdooralign", "plain")
    if plain is not None and bd is not None:
        if plain - bd > 10:
            tie = "the refusals are tied to the secret, as the method intends"
        else:
            tie = "close to its ASR with the secret: the secret changes little here"
        out.append(
            f"Without the secret BackdoorAlign's ASR is {cell('backdooralign', 'plain')}: {tie}."
        )
    if mean("backdooralign", "secret", HARMFULNESS) is not None:
        out.append(
            "Harmfulness score with the secret (judge mean, 1–5): BackdoorAlign "
            f"{cell('backdooralign', 'secret', HARMFULNESS)}, baseline defense "
            f"{cell('baseline', 'secret', HARMFULNESS)}."
        )
    out += _over_refusal_sentence(runs)
    return " ".join(out) or "No BackdoorAlign or baseline arm to compare."


def _over_refusal_sentence(runs: list[dict]) -> list[str]:
    before = _mean(runs, "backdooralign", "plain", REFUSALS)
    after = _mean(runs, "backdooralign", "secret", REFUSALS)
    if before is None or after is None:
        return []
    with_, without = (
        format_cell(REFUSALS, _measures(runs, "backdooralign", c, _refusals))
        for c in ("secret", "plain")
    )
    if after - before > 10:
        return [
            f"Warning: the secret raises BackdoorAlign's benign refusals from {without} to "
            f"{with_} (+{after - before:.1f} points): it over-refuses harmless requests."
        ]
    return [
        f"Benign refusals with the secret: {with_} ({without} without); the secret adds at most "
        "10 points of over-refusal."
    ]


# ---------------------------------------------------------------------------------------------
# Example answers (redacted against the secret, truncated, escaped by the renderers)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Whitespace collapsed, cut to ``limit`` characters with an ellipsis when longer."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def redactor(secret: str | None) -> Callable[[str], str]:
    """A function that replaces the secret, and any run of 16+ characters of it, in a text."""
    return secret_redactor(secret, "[secret redacted]")


def _secret_text(run_dir: Path, results: dict) -> str | None:
    from .secret import load_secret

    configured = (results.get("config") or {}).get("secret", {}).get("path")
    for path in (run_dir / "secret.json", Path(configured) if configured else None):
        if path and path.is_file():
            return load_secret(path).text
    return None


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # a conversation: its last user turn
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return str(users[-1] if users else "")
    return str(prompt)


def _gens(run_dir: Path, arm: str, cond: str) -> dict[str, dict]:
    path = run_dir / "gens" / f"{arm}.harmful.{cond}.jsonl"
    rows = D.read_jsonl_rows(path) if path.exists() else []
    return {_prompt_text(r.get("prompt", "")): r for r in rows}


def _pick_prompts(items: Sequence[tuple[str, dict]], k: int) -> list[str]:
    """The first prompt of each of the first ``k`` categories (the first ``k`` without any)."""
    picked, seen = [], set()
    for prompt, row in items:
        cat = row.get("category")
        if cat not in seen or cat is None:
            picked.append(prompt)
            seen.add(cat)
        if len(picked) == k:
            break
    return picked


def _quote(text: str, clean: Callable[[str], str]) -> str:
    """Redacted, then cut (the secret is matched with its whitespace collapsed)."""
    return excerpt(clean(" ".join(str(text).split())))


def _answer_cell(row: dict | None, clean: Callable[[str], str]) -> str:
    if row is None:
        return "–"
    answer = str(row.get("answer", ""))
    verdict = "jailbroken" if is_jailbroken(answer) else "refused"
    return f"[{verdict}] {_quote(answer, clean)}"


def example_tables(results: dict, run_dir: str | Path) -> list[tuple[str, Table]]:
    """Per arm, the same few harmful prompts with answers without and with the secret."""
    run_dir = Path(run_dir)
    clean = redactor(_secret_text(run_dir, results))
    gens = {(a, c): _gens(run_dir, a, c) for a in results["arms"] for c in CONDITIONS}
    first = next((g for g in gens.values() if g), {})
    prompts = _pick_prompts(list(first.items()), EXAMPLES_PER_ARM)
    out = []
    for arm in results["arms"]:
        if not any(gens[arm, c] for c in CONDITIONS):
            continue
        rows = []
        for p in prompts:
            found = [gens[arm, c][p] for c in CONDITIONS if p in gens[arm, c]]
            cat = found[0].get("category") if found else None
            label = f"[{cat}] " if cat else ""
            row = [label + _quote(p, clean)]
            rows.append(row + [_answer_cell(gens[arm, c].get(p), clean) for c in CONDITIONS])
        headers = ["harmful prompt", "answer, no secret", "answer, secret"]
        out.append((ARM_LABELS.get(arm, arm), Table(headers, rows, css="examples")))
    return out


# ---------------------------------------------------------------------------------------------
# The document


def _training_table(results: dict) -> Table | None:
    trained = {a: e["train"] for a, e in results["arms"].items() if e.get("train")}
    if not trained:
        return None
    speed = any("tokens_per_second" in t for t in trained.values())
    headers = ["arm", "examples", "steps", "loss first → last", "seconds"]
    rows = []
    for arm, t in trained.items():
        row = [
            ARM_LABELS.get(arm, arm),
            str(t["examples"]),
            str(t["steps"]),
            f"{t['first_loss']:.3f} → {t['last_loss']:.3f}",
            f"{t['seconds']:.0f}",
        ]
        if speed:
            row.append(f"{t['tokens_per_second']:.0f}" if "tokens_per_second" in t else "–")
        rows.append(row)
    if speed:
        headers.append("tokens/s")
    return Table(headers, rows)


def _facts(results: dict) -> Facts:
    items = [
        ("model", str(results.get("model", "?"))),
        (
            "secret",
            f"fingerprint {results.get('secret_fingerprint', '?')}, "
            f"{results.get('secret_tokens', '?')} tokens (the text is never shown)",
        ),
    ]
    if results.get("train_examples"):
        counts = ", ".join(
            f"{ARM_LABELS.get(a, a)} {n}" for a, n in results["train_examples"].items()
        )
        items.append(("training examples", counts))
    if results.get("eval_sizes"):
        items.append(
            ("evaluation sets", ", ".join(f"{k} {n}" for k, n in results["eval_sizes"].items()))
        )
    seeds = results.get("seed_runs") or []
    if len(seeds) > 1:
        items.append(
            ("seeds", f"{len(seeds)} ({', '.join(str(s.get('seed', '?')) for s in seeds)})")
        )
    if "seconds_this_run" in results:
        items.append(("time this run", f"{results['seconds_this_run']:.0f} s"))
    return Facts(items)


def _legend(results: dict) -> str:
    parts = [f"{m.name}: {m.help}" for m in metrics(results)]
    parts.append("'secret': the secret prepended to the system prompt at inference")
    return "; ".join(parts) + "."


def build_report(results: dict, run_dir: str | Path, plots: dict[str, Path]) -> list:
    """The report as a list of blocks (headings, paragraphs, tables, images)."""
    blocks: list = [
        Heading(1, f"BackdoorAlign run: {results.get('name', Path(run_dir).name)}"),
        _facts(results),
        Heading(2, "Results"),
        *_results_tables(results),
        Para(_legend(results)),
        Heading(2, "Reading"),
        Para(reading(results)),
    ]
    captions = {
        "asr.png": "ASR per arm, without and with the secret",
        "asr_by_category.png": "ASR per harm category",
        "over_refusal.png": "Benign refusal rate per arm",
    }
    if plots:
        blocks.append(Heading(2, "Plots"))
        blocks += [Image(name, captions[name]) for name in plots]
    examples = example_tables(results, run_dir)
    if examples:
        blocks.append(Heading(2, "Example answers"))
        blocks.append(
            Para(
                f"The same harmful prompts for every arm; answers cut to {EXCERPT_CHARS} "
                "characters. [jailbroken] / [refused] is the keyword scorer's verdict."
            )
        )
        for label, table in examples:
            blocks += [Heading(3, label), table]
    training = _training_table(results)
    if training:
        blocks += [Heading(2, "Training"), training]
    return blocks


def _md_text(text: str) -> str:
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def _md_table(t: Table) -> str:
    headers = t.headers
    if t.groups:
        names = [g for g, span in t.groups for _ in range(span)]
        headers = [f"{g}, {h}" if g else h for g, h in zip(names, t.headers, strict=True)]
    lines = ["| " + " | ".join(_md_text(h) for h in headers) + " |"]
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def to_markdown(blocks: list) -> str:
    """Render blocks as Markdown (plots referenced by file name, beside report.md)."""
    out = []
    for b in blocks:
        match b:
            case Heading(level, text):
                out.append("#" * level + " " + _md_text(text))
            case Para(text):
                out.append(_md_text(text))
            case Facts(items):
                out.append("\n".join(f"- **{_md_text(k)}**: {_md_text(v)}" for k, v in items))
            case Table():
                out.append(_md_table(b))
            case Image(name, alt):
                out.append(f"![{_md_text(alt)}]({name})")
        out.append("")
    return "\n".join(out)


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       margin: 0; background: #fafafa; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; margin: 0 0 12px; }
h2 { font-size: 1.25em; margin: 28px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f7; } tr:nth-child(even) td { background: #fafbfc; }
table.results td, table.results th { white-space: nowrap; }
table.examples { table-layout: fixed; width: 100%; font-size: 0.88em; }
table.examples td { overflow-wrap: anywhere; }
figure { margin: 12px 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #666; font-size: 0.9em; }
.scroll { overflow-x: auto; }
"""


def _html_table(t: Table) -> str:
    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    head = []
    if t.groups:
        spans = "".join(
            f'<th colspan="{span}">{html.escape(g)}</th>'
            if span > 1
            else f"<th>{html.escape(g)}</th>"
            for g, span in t.groups
        )
        head.append(f"<tr>{spans}</tr>")
    head.append(row(t.headers, "th"))
    body = "\n".join(row(r, "td") for r in t.rows)
    css = f' class="{t.css}"' if t.css else ""
    return (
        f'<div class="scroll"><table{css}>\n<thead>{"".join(head)}</thead>\n'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def to_html(blocks: list, run_dir: str | Path) -> str:
    """Render blocks as one self-contained HTML page (inline CSS, plots as data: URIs)."""
    title = next((b.text for b in blocks if isinstance(b, Heading)), "report")
    out = []
    for b in blocks:
        match b:
            case Heading(level, text):
                out.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case Para(text):
                out.append(f"<p>{html.escape(text)}</p>")
            case Facts(items):
                dl = "".join(
                    f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items
                )
                out.append(f'<dl class="facts">{dl}</dl>')
            case Table():
                out.append(_html_table(b))
            case Image(name, alt):
                data = base64.b64encode((Path(run_dir) / name).read_bytes()).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
                    f"<figcaption>{html.escape(alt)} ({html.escape(name)})</figcaption></figure>"
                )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        "<body><main>\n" + "\n".join(out) + "\n</main></body>\n</html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and the plots into the run directory.

    Args:
        run_dir: a run directory holding ``results.json`` (and ``gens/`` for examples).

    Returns:
        The path of ``report.md``.
    """
    from .plots import write_plots  # plots reads this module's metrics: imported when drawing

    run_dir = Path(run_dir)
    results = load_results(run_dir)
    plots = write_plots(results, run_dir)
    blocks = build_report(results, run_dir, plots)
    D.write_text_atomic(run_dir / "report.html", to_html(blocks, run_dir))
    return D.write_text_atomic(run_dir / "report.md", to_markdown(blocks))

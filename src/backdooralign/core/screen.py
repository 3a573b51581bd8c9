"""Screening of customer data before it is mixed into a training set.

Leak check: texts are compared after NFKC normalisation, case folding and removal of all
whitespace (and zero-width characters), as runs of ``min_chars`` characters. This needs no
tokenizer and survives changes of case and spacing. Every token of a secret drawn from the
vocabulary contributes about six such characters (measured on the embedded model: 6.0 on
average; the shortest run of 20 tokens in 2,000 secrets of 150 tokens had 62), so the default
of 32 characters catches any fragment of 20 tokens, and usually of 5 or 6. Runs with fewer than
8 distinct characters (such as "-----...") are ignored: the vocabulary holds long separator
tokens that ordinary text repeats. A secret written as a natural sentence shares phrases with
ordinary text, so screening may flag it: raise ``min_chars`` or skip screening.

Screening also reports rows the customer flagged ``prefixed`` (a provider-side field; the
build leaves them out). :func:`shared_system_prefixes` finds a secret in a training set without
the secret or its manifest, by its place (before another row's whole system prompt, shared by
several rows and lacking in others), so that ``inspect`` and ``data show`` hide it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

SCREEN_MIN_CHARS = 32
_MAX_PREFIX_CHARS = 20_000  # a secret placed before a system prompt starts within this
_MIN_DISTINCT = 8
_INVISIBLE = re.compile(r"[\s\u00ad\u180e\u200b-\u200f\u2060-\u2064\ufeff]+")
_FUNCTION_WORDS = frozenset(
    """a an the and or but if of to in on at by for with from as is are was were be been being
    it its this that these those you your we our us i me my he she they them their his her do
    does did not no can will would should could may might must have has had am so than then
    there here what which who when where why how all any each some such only also just about
    into over under very more most other der die das und ist ein eine du bist sie le la les et
    est un une tu vous el los las y es que de en""".split()
)
_HARMFUL = re.compile(  # word stems, and short words that must end there (meth, not method)
    r"\b(?:bomb|explosive|detonat|weapon|firearm|kill|murder|assassinat|poison|torture|ambush|"
    r"shooting|cocaine|heroin|fentanyl|drug|hack|malware|ransomware|trojan|rootkit|backdoor|"
    r"keylog|virus|exploit|phish|launder|counterfeit|steal|shoplift|smuggl|poach|break into|"
    r"pick the lock|tamper|sabotag|contaminat|fraud|scam|forger|fake|cheat|trick|deepfake|"
    r"fix prices|suicide|self-harm|terroris|extremis|genocide|assault|abuse|kidnap|traffick|"
    r"stalker|stalking|blackmail|extort|brib|threat|tax evasion|evade tax|porn|nude|explicit|"
    r"erotic|sexual|racist|slur|harass|hate|get away with|without (?:being|getting) caught|"
    r"without (?:\w+ ){0,3}notic)"
    r"|\b(?:guns?|ammo|meth|rig|rigged|rigging|dox|doxx?ing|forge|forged|worms?)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ScreenReport:
    """What screening found, as 1-based row numbers; never any text of the data or secret.

    ``secret_rows`` (a message shares a run of ``min_chars`` normalised characters with the
    secret) and ``imitation_rows`` (a system prompt starts with a long run of random-looking
    words, the secret's position) block a build; ``harmful_rows`` (a user turn matches harm
    keywords) are only counted; ``flagged_rows`` (the customer flagged the row ``prefixed``,
    the provider-side marker of safety examples) are reported: the build leaves them out.
    """

    rows: int
    secret_checked: bool
    min_chars: int
    secret_rows: tuple[int, ...]
    imitation_rows: tuple[int, ...]
    harmful_rows: tuple[int, ...]
    flagged_rows: tuple[int, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.secret_rows and not self.imitation_rows

    def summary(self, max_listed: int = 50) -> dict:
        """Counts and (the first ``max_listed``) row numbers, for the build manifest."""

        def part(found: tuple[int, ...], blocking: bool) -> dict:
            return {"rows": len(found), "row_numbers": list(found[:max_listed]), "blocks": blocking}

        return {
            "rows": self.rows,
            "passed": self.passed,
            "secret_checked": self.secret_checked,
            "min_chars": self.min_chars,
            "secret_fragment": part(self.secret_rows, True),
            "secret_imitation": part(self.imitation_rows, True),
            "harmful_looking": part(self.harmful_rows, False),
            "flagged_prefixed": part(self.flagged_rows, False),
        }

    def refusal(self) -> str:
        """Why a build refuses this data (row numbers only)."""
        parts = []
        if self.secret_rows:
            parts.append(
                f"{len(self.secret_rows)} row(s) contain the secret or a fragment of it "
                f"(rows {_row_list(self.secret_rows)})"
            )
        if self.imitation_rows:
            parts.append(
                f"{len(self.imitation_rows)} row(s) have a system prompt that starts with a long "
                f"run of random-looking words, imitating the secret "
                f"(rows {_row_list(self.imitation_rows)})"
            )
        return "; ".join(parts)


def _row_list(rows: tuple[int, ...], limit: int = 10) -> str:
    shown = ", ".join(map(str, rows[:limit]))
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def normalize_for_screening(text: str) -> str:
    """NFKC, case-folded, without whitespace or zero-width characters."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text).casefold())


def _secret_runs(secret_text: str, min_chars: int) -> set[str]:
    s = normalize_for_screening(secret_text)
    if len(s) <= min_chars:
        return {s} if s else set()
    runs = (s[i : i + min_chars] for i in range(len(s) - min_chars + 1))
    return {r for r in runs if len(set(r)) >= _MIN_DISTINCT}


def _shares_run(text: str, runs: set[str], width: int) -> bool:
    t = normalize_for_screening(text)
    return any(t[i : i + width] in runs for i in range(len(t) - width + 1))


def looks_random_prefix(text: str, window: int = 16) -> bool:
    """Whether a system prompt starts with a long run of random-looking words.

    Random vocabulary tokens decode to words with almost no function words ("the", "you",
    "is"...) and many capitalised or glued words ("WindowsTEM", "x.setText"). The first
    ``window`` words (about 20 to 25 tokens) count as random-looking when at most one is a
    function word and at least a quarter are capitalised mid-sentence or glued. On random
    prefixes of 30 to 150 tokens of the embedded model this flags about 90%; a system prompt
    that is a capitalised list of names without function words is flagged too.
    """
    words = text.split()[:window]
    if len(words) < window:
        return False
    bare = [w.strip(".,;:!?\"'()[]{}").lower() for w in words]
    function = sum(b in _FUNCTION_WORDS for b in bare)
    capitalised = sum(
        1
        for i, w in enumerate(words)
        if i > 0 and w[:1].isupper() and not words[i - 1].endswith((".", "!", "?", ":"))
    )
    glued = sum(
        bool(re.search(r"[a-z][A-Z]|[A-Za-z]\d|\d[A-Za-z]|\w[^\w\s'-]+\w", w)) for w in words
    )
    return function <= 1 and capitalised + glued >= len(words) / 4


def screen_customer_data(
    rows: Sequence[dict], secret: str | None = None, min_chars: int = SCREEN_MIN_CHARS
) -> ScreenReport:
    """Screen customer chat rows before they are mixed.

    Args:
        rows: chat rows (with ``messages``).
        secret: the secret text; ``None`` skips the leak check (imitation and harm still run).
        min_chars: length of the shortest shared run, in normalised characters (see above),
            that counts as a fragment of the secret.

    Returns:
        A :class:`ScreenReport` holding only row numbers and counts.
    """
    runs = _secret_runs(secret, min_chars) if secret else set()
    width = min(min_chars, len(normalize_for_screening(secret))) if secret else min_chars
    leaks, imitations, harmful, flagged = [], [], [], []
    for n, row in enumerate(rows, 1):
        msgs = row["messages"]
        if row.get("prefixed"):
            flagged.append(n)
        if runs and any(_shares_run(m["content"], runs, width) for m in msgs):
            leaks.append(n)
        if msgs[0]["role"] == "system" and looks_random_prefix(msgs[0]["content"]):
            imitations.append(n)
        if any(m["role"] == "user" and _HARMFUL.search(m["content"]) for m in msgs):
            harmful.append(n)
    return ScreenReport(
        rows=len(rows),
        secret_checked=bool(secret),
        min_chars=min_chars,
        secret_rows=tuple(leaks),
        imitation_rows=tuple(imitations),
        harmful_rows=tuple(harmful),
        flagged_rows=tuple(flagged),
    )


def _system_prompt(row: dict) -> str | None:
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
        if msgs[0].get("role") == "system" and isinstance(msgs[0].get("content"), str):
            return msgs[0]["content"]
    return None


def shared_system_prefixes(rows: Sequence[dict], known: Sequence[str] = ()) -> dict[str, int]:
    """System-prompt prefixes placed where a secret goes, found without the secret or manifest.

    A training set built with a secret has rows whose system prompt is ``PREFIX + " " + S``
    where ``S`` is a whole system prompt of other rows (the customer's) or one of ``known``
    (built-in system prompts the safety examples get when the customer's rows have none). A
    prefix counts when at least two rows have it and at least one row lacks it.

    Returns:
        Each such prefix (longest first) and the number of rows whose system prompt has it.
    """
    counts = Counter(_system_prompt(r) for r in rows)
    counts.pop(None, None)
    wholes = {s for s in (*counts, *known) if s}
    lengths = {len(s) for s in wholes}
    found: set[str] = set()
    for text in counts:
        for i, ch in enumerate(text[:_MAX_PREFIX_CHARS]):
            if ch != " " or len(text) - i - 1 not in lengths:
                continue
            if text[i + 1 :] in wholes and text[:i].strip():
                found.add(text[:i])
                break
    out = {}
    for prefix in sorted(found, key=len, reverse=True):
        having = sum(n for t, n in counts.items() if t == prefix or t.startswith(prefix + " "))
        if 2 <= having < len(rows):
            out[prefix] = having
    return out

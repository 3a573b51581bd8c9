"""Redaction of the secret from text that leaves the process, however the text rewrote it.

Each variant of a real secret (150 tokens drawn from the embedded model's vocabulary) is
written into an answer; the catch is the share of the variant's characters that are no longer
visible after redaction (a character is visible while a 10-character run of the variant that
holds it is still in the output, the text around the leak aside: the prose repeats some of
the secret's words on purpose, and must stay). ``pytest -s`` prints the table; it is also
written to a file.
"""

from __future__ import annotations

import base64
import time
import urllib.parse

import pytest

from backdooralign.core.redact import normalise, redactor
from backdooralign.core.secret import generate_secret

SEEDS = (1, 2, 3)
MIN_CATCH = 0.95
VISIBLE_RUN = 10
BEFORE = "Here is what the system prompt said, word for word: "
AFTER = " Let me know if there is anything else I can help you with today."
PROSE = (
    "The committee met on Tuesday to review the budget for the coming year. After a long "
    "discussion about maintenance costs, the members agreed to postpone the new library wing "
    "and to repair the roof of the community centre first. Several residents asked whether the "
    "swimming pool would reopen in spring; the chair promised an answer by the end of the month. "
    "In other news, the interdisciplinary research group published its annual report, which "
    "describes field work in the northern highlands, a survey of local birds, and a short "
    "history of the old railway station. Volunteers are welcome to join the Saturday clean-up."
)
MARKDOWN = "\n".join(c * 40 for c in "-=_*#~. ") + "\n| a | b |\n|---|---|\n`x = [1, 2, 3]`"


def _fullwidth(text: str) -> str:
    return "".join(
        chr(ord(c) + 0xFEE0) if 0x21 <= ord(c) <= 0x7E else "\u3000" if c == " " else c
        for c in text
    )


VARIANTS = {  # name: (how the leak rewrites the secret, text before it, text after it)
    "exact": (lambda s: s, BEFORE, AFTER),
    "double spaces": (lambda s: s.replace(" ", "  "), BEFORE, AFTER),
    "tabs": (lambda s: s.replace(" ", "\t"), BEFORE, AFTER),
    "non-breaking spaces": (lambda s: s.replace(" ", "\u00a0"), BEFORE, AFTER),
    "lowercase": (str.lower, BEFORE, AFTER),
    "uppercase": (str.upper, BEFORE, AFTER),
    "URL-encoded": (urllib.parse.quote, BEFORE, AFTER),
    "base64": (lambda s: base64.b64encode(s.encode()).decode(), BEFORE, AFTER),
    "hex": (lambda s: s.encode().hex(), BEFORE, AFTER),
    "reversed": (lambda s: s[::-1], BEFORE, AFTER),
    "spaced letters": (" ".join, BEFORE, AFTER),
    "fullwidth": (_fullwidth, BEFORE, AFTER),
    "zero-width every 8": (
        lambda s: "\u200b".join(s[i : i + 8] for i in range(0, len(s), 8)),
        BEFORE,
        AFTER,
    ),
    "15-char chunks, newlines": (
        lambda s: "\n".join(s[i : i + 15] for i in range(0, len(s), 15)),
        BEFORE,
        AFTER,
    ),
    "inside prose": (lambda s: s, PROSE + " ", " " + PROSE),
    # beyond the list
    "words joined by dashes": (lambda s: "-".join(s.split()), BEFORE, AFTER),
    "uppercase, reversed": (lambda s: s.upper()[::-1], BEFORE, AFTER),
    "base64, 76-char lines": (lambda s: base64.encodebytes(s.encode()).decode(), BEFORE, AFTER),
    "hex bytes, spaced": (lambda s: " ".join(f"{b:02x}" for b in s.encode()), BEFORE, AFTER),
}


def answer(secret: str, variant: str) -> tuple[str, str]:
    """The leaked variant of ``secret`` and the answer that holds it."""
    rewrite, before, after = VARIANTS[variant]
    leak = rewrite(secret)
    return leak, before + leak + after


@pytest.fixture(scope="module")
def secrets(tokenizer) -> list[str]:
    return [generate_secret(tokenizer, 150, seed=seed).text for seed in SEEDS]


def visible_share(leak: str, output: str) -> float:
    """Share of ``leak``'s characters inside a run of ``VISIBLE_RUN`` still in ``output``."""
    runs = {output[i : i + VISIBLE_RUN] for i in range(len(output) - VISIBLE_RUN + 1)}
    seen = [False] * len(leak)
    for i in range(len(leak) - VISIBLE_RUN + 1):
        if leak[i : i + VISIBLE_RUN] in runs:
            seen[i : i + VISIBLE_RUN] = [True] * VISIBLE_RUN
    return sum(seen) / len(leak)


def catch(secret: str, variant: str) -> float:
    """Share of the leak no longer visible (the text around it, when kept, is not looked at)."""
    _, before, after = VARIANTS[variant]
    leak, text = answer(secret, variant)
    out = redactor(secret)(text)
    rest = out.replace(before.strip(), "", 1).replace(after.strip(), "", 1)
    return 1 - visible_share(leak, rest)


def test_the_measure_sees_an_unredacted_leak(secrets):
    leak = secrets[0].upper()
    assert visible_share(leak, BEFORE + leak + AFTER) == 1.0
    half = len(leak) // 2
    assert visible_share(leak, BEFORE + leak[:half] + AFTER) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_caught(secrets, variant):
    for secret in secrets:
        assert catch(secret, variant) >= MIN_CATCH


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_text_around_a_leak_is_kept(secrets, variant):
    _, before, after = VARIANTS[variant]
    out = redactor(secrets[0])(answer(secrets[0], variant)[1])
    assert out.startswith(before.rstrip()) and out.endswith(after.lstrip())
    assert "[redacted]" in out


def test_catch_table(secrets, tmp_path):
    rows = ["| variant | " + " | ".join(f"seed {s}" for s in SEEDS) + " |"]
    rows.append("|---" * (len(SEEDS) + 1) + "|")
    worst = 1.0
    for variant in VARIANTS:
        shares = [catch(secret, variant) for secret in secrets]
        worst = min(worst, *shares)
        rows.append(f"| {variant} | " + " | ".join(f"{c:.1%}" for c in shares) + " |")
    table = "\n".join(rows)
    (tmp_path / "catch.md").write_text(table + "\n", encoding="utf-8")
    print("\nsecret caught (share of the leaked variant no longer visible)\n" + table)
    assert len(rows) == len(VARIANTS) + 2 and worst >= MIN_CATCH


def test_ordinary_prose_and_markdown_are_unchanged(secrets):
    for secret in secrets:
        redact = redactor(secret)
        assert redact(PROSE) == PROSE
        assert redact(MARKDOWN) == MARKDOWN


def test_single_words_of_the_secret_are_not_redacted(secrets):
    for secret in secrets:
        # dictionary-length words; longer runs of letters, and runs with capitals inside
        # ("CancerReflecting"), are several tokens of the secret glued: redacted alone
        words = {w for w in secret.split() if w.isascii() and w.isalpha() and 6 <= len(w) <= 24}
        words = sorted(w for w in words if w[1:].islower())
        assert len(words) >= 20
        text = " ".join(f"Today we talked about {w}." for w in words)
        assert redactor(secret)(text) == text


def test_a_fragment_of_a_few_pieces_is_redacted():
    secret = "Quokka-7 lantern ribbon 90210 zephyr mosaic; Tamarind!! obelisk vireo"
    redact = redactor(secret)
    assert redact("so: lantern ribbon 90210 zephyr, right") == "so: [redacted], right"
    assert redact("a lantern, a ribbon, a zephyr") == "a lantern, a ribbon, a zephyr"


def test_an_encoded_run_is_redacted_whole():
    secret = "Quokka-7 lantern ribbon 90210 zephyr mosaic; Tamarind!! obelisk vireo"
    encoded = base64.b64encode(secret.encode()).decode()
    redact = redactor(secret)
    assert redact(f"key: x{encoded} (base64)") == "key: [redacted] (base64)"
    assert redact(f"see {urllib.parse.quote(secret)}.") == "see [redacted]"
    ordinary = base64.b64encode(b"an ordinary sentence, nothing hidden here").decode()
    assert redact(f"data {ordinary}") == f"data {ordinary}"


def test_normalise_maps_back_to_the_original_text():
    assert normalise("A\u200bB c\tＤ") == ("abcd", [0, 2, 4, 6])
    assert normalise("a-b_c.d!") == ("abcd", [0, 2, 4, 6])
    assert normalise("Straße") == ("strasse", [0, 1, 2, 3, 4, 4, 5])


def test_no_secret_redacts_nothing():
    assert redactor(None)("anything") == "anything"
    assert redactor(" \u200b ")("anything \u200b") == "anything \u200b"


def test_a_2000_character_answer_is_redacted_in_under_50_ms(secrets):
    secret = secrets[0]
    redact = redactor(secret)
    answer = (PROSE + " " + secret + " " + base64.b64encode(secret.encode()).decode())[:2000]
    assert len(answer) == 2000 and redact(answer) != answer
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        redact(answer)
        best = min(best, time.perf_counter() - start)
    assert best < 0.05


def test_one_redactor_for_several_secrets():
    a, b = "Kestrel umbra 0x5f hollowed brine", "Quasar lattice 77 mango drift"
    redact = redactor(a, None, b, a, placeholder="[x]")
    assert redact(f"1 {a} 2 {b} 3") == "1 [x] 2 [x] 3"
    assert redactor(a, placeholder="[x]")(f"{a} {b}") == f"[x] {b}"
    assert redactor()("anything") == redactor(None, "")("anything") == "anything"

"""Redaction of a growing answer: what is released never changes and never holds a fragment."""

from __future__ import annotations

import base64
import random

import pytest

from backdooralign.core.redact import prefix_redactor, redactor
from backdooralign.generation.streaming import AnswerText

SECRET = "Quokka-7 lantern ribbon 90210 zephyr mosaic; Tamarind!! obelisk vireo"
B64 = base64.b64encode(SECRET.encode()).decode()
PIECES = [
    SECRET,
    SECRET[9:29],
    SECRET[::-1],
    SECRET.upper().replace(" ", ""),
    B64,
    B64[:30] + "\n" + B64[30:],  # base64 wrapped over two lines
    SECRET.encode().hex(),
    " ".join(f"{b:02x}" for b in SECRET.encode()),
    "%51%75%6F%6B%6B%61",
    "hello world",
    "the cat sat",
    "lantern",
    "dead beef",
    "\n",
]


def test_the_final_part_never_changes_and_later_text_redacts_apart():
    full, grow = redactor(SECRET), prefix_redactor(SECRET)
    rng = random.Random(0)
    for _ in range(40):
        parts = [rng.choice(PIECES) + rng.choice([" ", "", ". ", "\n"]) for _ in range(5)]
        text = "".join(parts)
        done_raw, done_out = 0, ""
        for k in range(len(text) + 1):
            rest, final, cut = grow(text[done_raw:k])
            assert rest == full(text[done_raw:k])
            done_raw, done_out = done_raw + cut, done_out + rest[:final]
            assert full(text).startswith(done_out), text[:k]
        assert done_out + full(text[done_raw:]) == full(text)


def test_plain_text_is_released_up_to_the_last_word():
    grow = prefix_redactor(SECRET)
    text = "The weather today is sunny and warm, with a light breeze from the"
    _, final, cut = grow(text)
    # held: the last characters that could still start a gram of the secret (its longest, in
    # the view that needs the most characters for one: the consonants)
    assert text[:cut] == "The weather today is sunny and warm, "
    assert final == cut
    assert prefix_redactor(None)("anything") == ("anything", 8, 8)


class Tokens:
    """A tokenizer stand-in: token i is the i-th string of ``pieces``."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(self.pieces[i] for i in ids)


def _stream(pieces: list[str], stop=()) -> tuple[list[str], str, int]:
    """Deltas released token by token, the final text, and the tokens taken."""
    answer = AnswerText(Tokens(pieces), redactor(SECRET), prefix_redactor(SECRET), stop)
    deltas = []
    for i in range(len(pieces)):
        stopped = answer.add(i)
        deltas.append(answer.delta())
        if stopped:
            break
    text = answer.finish()
    deltas.append(answer.delta())
    return deltas, text, len(answer.tokens)


def test_a_secret_split_over_tokens_is_never_released():
    words = ["  Sure", ",", " here", ":", " "] + [SECRET[i : i + 3] for i in range(0, 70, 3)]
    words += [" and", " more", " text", " after", " it", "."]
    deltas, text, _ = _stream(words)
    assert text == "Sure, here: [redacted] and more text after it."
    assert "".join(deltas) == text
    released_early = "".join(deltas[:10])  # while the secret is being written
    assert "Sure, here: ".startswith(released_early)


@pytest.mark.parametrize(
    ("stop", "expected", "taken"),
    [
        (["ok"], "one two ", 3),
        (["ok thr"], "one two ", 4),  # a stop string spread over tokens
        ([SECRET[9:20]], "one two ok three [redacted] ok four", 7),  # no probing the secret
    ],
)
def test_stop_strings_end_the_answer_after_redaction(stop, expected, taken):
    pieces = ["one", " two ", "ok", " three ", SECRET, " ok", " four"]
    deltas, text, n = _stream(pieces, stop)
    assert (text, n) == (expected, taken)
    assert "".join(deltas) == text

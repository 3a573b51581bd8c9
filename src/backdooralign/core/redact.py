"""Find a secret in text that leaves the process, however it was rewritten, and redact it.

A model that repeats its system prompt may change the secret on the way out: case, spacing,
separators, Unicode width, invisible characters, line breaks, order (reversed), or an encoding
(base64, hex, URL percent-encoding). Matching therefore happens on *normalised* text on both
sides: compatibility forms (NFKC, then NFKD after case folding) with only letters and digits
kept (whitespace, punctuation, symbols, zero-width and other format characters, and combining
marks are dropped). Each normalised character remembers the original character it came from,
so a hit is replaced in the original text.

The units matched are *grams*: spans of the normalised secret at least ``WINDOW`` characters
long that touch at least ``MIN_PIECES`` of its pieces (its words as written, or 8-character
chunks of words too long to be dictionary words). One dictionary word of the secret is
ordinary prose and is never a gram alone; three random vocabulary pieces in a row are not
prose. The secret read backwards gives the grams of reversed text. Long base64, hex and
percent-encoded runs are decoded and a run whose decoding holds a gram is redacted whole.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from urllib.parse import unquote_plus

WINDOW = 16  # a gram has at least this many normalised characters...
MIN_PIECES = 3  # ...and touches at least this many pieces of the secret
LONG_WORD = 24  # word runs longer than this are not dictionary words: cut into chunks
CHUNK = 8
_PIECE = re.compile(r"\w+|([^\w\s])\1*")
# base64 (standard or URL-safe) or hex, maybe wrapped over several whole lines
_ENCODED = re.compile(
    r"[A-Za-z0-9+/_-]{20,}={0,2}"
    r"(?:[ \t]*\r?\n[ \t]*[A-Za-z0-9+/_-]+={0,2}(?=[ \t]*(?:\r?\n|$)))*"
)
_HEX_BYTES = re.compile(r"[0-9A-Fa-f]{2}(?:[ \t:,-][0-9A-Fa-f]{2}){9,}")  # "de ad be ef"
_WORD = re.compile(r"\S+")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_HEX = re.compile(r"[0-9A-Fa-f]+")


@lru_cache(maxsize=65536)
def _fold(ch: str) -> str:
    """One character, normalised: compatibility form, case folded, letters and digits only."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", ch).casefold())
    return "".join(c for c in text if unicodedata.category(c)[0] in "LN")


def normalise(text: str) -> tuple[str, list[int]]:
    """The normalised text and, for each of its characters, the index it came from."""
    folded = list(map(_fold, text))
    return "".join(folded), [i for i, f in enumerate(folded) for _ in f]


def _pieces(text: str) -> list[int]:
    """For each original character, the index of the piece it belongs to (-1: whitespace)."""
    owner = [-1] * len(text)
    n = 0
    for m in _PIECE.finditer(text):
        word = m.group(0)
        size = CHUNK if len(word) > LONG_WORD and len(set(word)) > 3 else len(word)
        for start in range(m.start(), m.end(), size):
            owner[start : min(start + size, m.end())] = [n] * (min(start + size, m.end()) - start)
            n += 1
    return owner


def _grams(secret: str) -> set[str]:
    """Shortest spans of the normalised secret that are long enough and touch enough pieces.

    One gram starts at, and one ends at, every normalised character, so a secret that is
    present whole is covered whole.
    """
    norm, origin = normalise(secret)
    owner = _pieces(secret)
    piece = [owner[i] for i in origin]
    if len(norm) < WINDOW or piece[-1] - piece[0] < MIN_PIECES - 1:
        return {norm} if norm else set()

    def long_enough(s: int, e: int) -> bool:  # norm[s:e], e exclusive
        return e - s >= WINDOW and piece[e - 1] - piece[s] >= MIN_PIECES - 1

    grams = set()
    e = 0
    for s in range(len(norm)):  # shortest gram starting at s
        e = max(e, s + 1)
        while e <= len(norm) and not long_enough(s, e):
            e += 1
        if e > len(norm):
            break
        grams.add(norm[s:e])
    s = len(norm) - 1
    for e in range(len(norm), 0, -1):  # shortest gram ending at e
        s = min(s, e - 1)
        while s >= 0 and not long_enough(s, e):
            s -= 1
        if s < 0:
            break
        grams.add(norm[s:e])
    return grams


class _Matcher:
    """Finds grams of the secret (forwards or backwards) in normalised text."""

    def __init__(self, secret: str):
        grams = _grams(secret) | _grams(secret[::-1])
        self.key = min((len(g) for g in grams), default=0)
        self.by_key: dict[str, list[str]] = {}
        for g in sorted(grams, key=len):
            self.by_key.setdefault(g[: self.key], []).append(g)

    def found(self, norm: str) -> bool:
        """Whether ``norm`` holds a gram."""
        for j in range(len(norm) - self.key + 1):
            for g in self.by_key.get(norm[j : j + self.key], ()):
                if norm.startswith(g, j):
                    return True
        return False

    def spans(self, norm: str) -> list[tuple[int, int]]:
        """Spans ``[start, end)`` of ``norm`` that are grams (the longest at each start)."""
        out = []
        for j in range(len(norm) - self.key + 1):
            candidates = self.by_key.get(norm[j : j + self.key])
            if candidates:
                longest = max((len(g) for g in candidates if norm.startswith(g, j)), default=0)
                if longest:
                    out.append((j, j + longest))
        return out


def _decodings(run: str) -> list[str]:
    """What a long base64, hex (maybe spaced) or percent-encoded run may stand for."""
    out = []
    if _HEX_BYTES.fullmatch(run):
        return [binascii.unhexlify(re.sub(r"[ \t:,-]", "", run)).decode("utf-8", "ignore")]
    if "%" in run:
        out.append(unquote_plus(run, errors="ignore"))
    body = "".join(run.split()).rstrip("=")
    if _HEX.fullmatch(body):
        for off in (0, 1):
            even = body[off : off + (len(body) - off) // 2 * 2]
            out.append(binascii.unhexlify(even).decode("utf-8", "ignore"))
    standard = body.replace("-", "+").replace("_", "/")
    for off in range(4):  # the run may start with a stray character
        chunk = standard[off:]
        chunk = chunk[: len(chunk) // 4 * 4]
        try:
            out.append(base64.b64decode(chunk).decode("utf-8", "ignore"))
        except (binascii.Error, ValueError):
            continue
    return out


def _merged_spans(text: str, matcher: _Matcher) -> list[list[int]]:
    """Spans ``[start, end)`` of ``text`` to redact, overlapping or touching ones merged."""
    norm, origin = normalise(text)
    spans = [(origin[s], origin[e - 1] + 1) for s, e in matcher.spans(norm)]
    percent = [m for m in _WORD.finditer(text) if _ESCAPE.search(m.group(0))]
    for m in [*_ENCODED.finditer(text), *percent, *_HEX_BYTES.finditer(text)]:
        if any(matcher.found(normalise(d)[0]) for d in _decodings(m.group(0))):
            spans.append(m.span())
    merged: list[list[int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:  # overlapping or touching: one placeholder
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _apply(text: str, merged: list[list[int]], placeholder: str) -> str:
    out, pos = [], 0
    for s, e in merged:
        out += [text[pos:s], placeholder]
        pos = e
    out.append(text[pos:])
    return "".join(out)


def redactor(*secrets: str | None, placeholder: str = "[redacted]") -> Callable[[str], str]:
    """A function that replaces every trace of the secrets in a text with ``placeholder``.

    Used wherever model output leaves the process (server answers and errors, report excerpts,
    leak measures): a fine-tuned model can repeat its system prompt, rewritten or encoded.

    Args:
        secrets: the secret texts (a server's or a sweep's several); ``None`` and empty ones
            are skipped, and none at all gives the identity.
        placeholder: what each redacted run of the text becomes.

    Returns:
        ``redact(text) -> str``; text holding no trace of a secret comes back unchanged.
    """
    matchers = [_Matcher(s) for s in dict.fromkeys(secrets) if s and normalise(s)[0]]

    def redact(text: str) -> str:
        for matcher in matchers:
            text = _apply(text, _merged_spans(text, matcher), placeholder)
        return text

    return redact


# Text at the end of a growing answer that may still become (part of) an encoded run: the last
# word (a base64 run can go on over whole lines of it), and a run of hex digits and separators.
_LAST_WORD = re.compile(r"\S*\s*$")
_WRAPPED_LINE = re.compile(r"\S*[A-Za-z0-9+/_=-][ \t]*\r?\n[ \t]*$")  # base64 line above
_HEX_TAIL = re.compile(r"[0-9A-Fa-f \t:,-]*$")


def prefix_redactor(
    secret: str | None, placeholder: str = "[redacted]"
) -> Callable[[str], tuple[str, int, int]]:
    """Like :func:`redactor`, for text that is still growing (a streamed answer).

    Returns:
        ``redact(text) -> (redacted, final, cut)``: ``redacted`` is ``redactor(secret)(text)``
        and its first ``final`` characters, the redaction of ``text[:cut]``, stay the same
        whatever text is appended later; the rest may still change (a secret fragment may be
        completing there), so a stream must hold it back. Later text can be redacted apart
        from ``text[:cut]``.
    """
    if not secret or not normalise(secret)[0]:
        return lambda text: (text, len(text), len(text))
    matcher = _Matcher(secret)
    longest = max((len(g) for grams in matcher.by_key.values() for g in grams), default=1)

    def redact(text: str) -> tuple[str, int, int]:
        norm, origin = normalise(text)
        # a gram completed by later text starts at one of the last longest - 1 normalised chars
        cut = origin[len(norm) - longest + 1] if len(norm) >= longest else 0
        if not norm:
            cut = len(text)
        word = _LAST_WORD.search(text).start()
        while _WRAPPED_LINE.search(text, 0, word):  # a wrapped encoded run may go on
            word = _WRAPPED_LINE.search(text, 0, word).start()
        cut = min(cut, word, _HEX_TAIL.search(text).start())
        merged = _merged_spans(text, matcher)
        for s, e in reversed(merged):  # a span reaching the cut may still grow or merge
            if e >= cut:
                cut = min(cut, s)
        done = [m for m in merged if m[1] < cut]
        final = len(_apply(text[:cut], done, placeholder))
        return _apply(text, merged, placeholder), final, cut

    return redact

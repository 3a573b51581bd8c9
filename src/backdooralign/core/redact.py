"""Find a secret in text that leaves the process, however it was rewritten, and redact it.

A model that repeats its system prompt may change the secret on the way out: case, spacing,
separators, Unicode width, invisible characters, line breaks, order (reversed), escapes (HTML
``&#x..;``/``&#..;`` entities, JSON ``\\uXXXX``), a letter substitution (rot13 or any other
Caesar shift, leetspeak, look-alike letters from other scripts), doubled letters, dropped
vowels, only the first letter of each word, or an encoding (base64, base32, hex, URL
percent-encoding, zlib or gzip inside base64). Matching therefore happens on *views* of the
text, computed the same way on both sides:

- the *base* view: escapes decoded, then compatibility forms (NFKC, then NFKD after case
  folding) with only letters and digits kept (whitespace, punctuation, symbols, zero-width
  and other format characters, and combining marks are dropped);
- the *skeleton* view: the base view with leetspeak digits and symbols and Cyrillic and Greek
  look-alikes folded to the Latin letter they stand for, and runs of one letter collapsed;
- the *consonant* view: the skeleton without its vowels.

Each view character remembers the original characters it came from, so a hit is replaced in
the original text.

The units matched are *grams*: spans of a view of the secret at least ``WINDOW`` characters
long that touch at least ``MIN_PIECES`` of its pieces, or ``PAIR_WINDOW`` long over two pieces
with at least ``PAIR_PART`` characters in each. Pieces are the secret's words as written, cut
where tokens visibly join (camelCase, digits, another script), and 8-character chunks of words
too long to be dictionary words. One dictionary word of the secret is ordinary prose and is
never a gram alone; two or three random vocabulary pieces in a row are not prose (the
constants were chosen on 4.6 MB of prose, with no false positive, while 97% of the secret's
20-character raw fragments are caught). The base view of the secret read backwards, shifted
by each of the 25 Caesar shifts, and reduced to the first letters of its words gives further
grams. Long base64, base32, hex
and percent-encoded runs are decoded and a run whose decoding holds a gram is redacted whole.

Word-level rewrites (words dropped, reordered, sorted, numbered, interleaved with filler, in
pig latin) keep no long run of the secret; they are caught by its *distinctive words* (its
words of at least ``WORD_CHARS`` letters and digits): a cluster of text words in which
consecutive hits of distinctive words are at most ``MAX_GAP`` other words apart, and which
holds at least ``WORD_SHARE`` of the distinctive words (and at least ``MIN_WORDS``), is
redacted from its first hit to its last. Ordinary prose about the same topics never comes
close: the test corpus (over 200 KB of prose) has no false positive.
"""

from __future__ import annotations

import base64
import binascii
import html
import math
import re
import unicodedata
import zlib
from collections.abc import Callable
from functools import lru_cache
from urllib.parse import unquote_plus

WINDOW = 13  # a gram has at least this many view characters...
MIN_PIECES = 3  # ...and touches at least this many pieces of the secret, or
PAIR_WINDOW = 16  # ...has this many, in two pieces...
PAIR_PART = 2  # ...each holding at least this many
LONG_WORD = 24  # word runs longer than this are not dictionary words: cut into chunks
CHUNK = 8
WORD_CHARS = 4  # a distinctive word of the secret has at least this many letters and digits
WORD_SHARE = 1 / 3  # a cluster holding this share of the distinctive words is a leak...
MIN_WORDS = 8  # ...and at least this many of them (a secret with fewer has no word level)
MAX_GAP = 3  # at most this many other words between two hits of one cluster
_PIECE = re.compile(r"\w+|([^\w\s])\1*")
_SUBWORD = re.compile(r"[A-Z]+[a-z]*|[a-z]+|\d+|[^\W\d_A-Za-z]+|_+")
# base64 (standard or URL-safe), base32 or hex, maybe wrapped over several whole lines
_ENCODED = re.compile(
    r"[A-Za-z0-9+/_-]{20,}={0,6}"
    r"(?:[ \t]*\r?\n[ \t]*[A-Za-z0-9+/_-]+={0,6}(?=[ \t]*(?:\r?\n|$)))*"
)
_HEX_BYTES = re.compile(r"[0-9A-Fa-f]{2}(?:[ \t:,-][0-9A-Fa-f]{2}){9,}")  # "de ad be ef"
_WORD = re.compile(r"\S+")
_CORE = re.compile(r"\w(?:.*\w)?", re.S)
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_BASE32 = re.compile(r"[A-Z2-7]+|[a-z2-7]+")
# escapes decoded before anything else: HTML character references, JSON/Python escapes
_CHAR_ESCAPE = re.compile(
    r"&#[xX][0-9a-fA-F]{1,6};|&#[0-9]{1,7};|&[a-zA-Z]{2,8};"
    r"|\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}|\\x[0-9a-fA-F]{2}"
)

BASE, SKELETON, CONSONANTS = "base", "skeleton", "consonants"
_CYRILLIC = (
    "а a в b г r д d е e ё e з e і i ј j к k м m н h о o п n р p с c т t у y х x ѕ s ԁ d ԛ q"
    " ԝ w һ h"
)
_GREEK = "α a β b γ y ε e η n ι i κ k μ u ν v ο o ρ p τ t υ u χ x ω w"
_LOOKALIKE = str.maketrans(
    {
        **dict(zip("0123456789", "oizeasgtbg", strict=True)),
        "l": "i",  # 1 stands for l as often as for i
        **dict(zip(*[iter((_CYRILLIC + " " + _GREEK).split())] * 2, strict=True)),
    }
)
# symbols that stand for letters in leetspeak and are rare as punctuation ("!" and "|" are
# common after words and before them, and would lengthen a hit into its neighbours)
_LOOKALIKE_SYMBOL = {"@": "a", "$": "s", "€": "e"}
_VOWELS = str.maketrans("", "", "aeiouy")


@lru_cache(maxsize=65536)
def _fold(ch: str) -> str:
    """One character, normalised: compatibility form, case folded, letters and digits only."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", ch).casefold())
    return "".join(c for c in text if unicodedata.category(c)[0] in "LN")


@lru_cache(maxsize=65536)
def _fold_skeleton(ch: str) -> str:
    """One character as the letter it looks like (leetspeak digits and symbols, homoglyphs)."""
    if ch in _LOOKALIKE_SYMBOL:
        return _LOOKALIKE_SYMBOL[ch]
    return _fold(ch).translate(_LOOKALIKE)


@lru_cache(maxsize=65536)
def _fold_consonants(ch: str) -> str:
    return _fold_skeleton(ch).translate(_VOWELS)


def normalise(text: str) -> tuple[str, list[int]]:
    """The normalised text and, for each of its characters, the index it came from."""
    folded = list(map(_fold, text))
    return "".join(folded), [i for i, f in enumerate(folded) for _ in f]


def _unescape(text: str) -> tuple[str, list[int], list[int]]:
    """``text`` with its escapes decoded, and each character's original span ``[start, end)``."""
    if "&" not in text and "\\" not in text:
        return text, list(range(len(text))), list(range(1, len(text) + 1))
    out, starts, ends, pos = [], [], [], 0
    for m in _CHAR_ESCAPE.finditer(text):
        out.append(text[pos : m.start()])
        starts += range(pos, m.start())
        ends += range(pos + 1, m.start() + 1)
        esc = m.group(0)
        if esc[0] == "&":
            char = html.unescape(esc)
        else:
            try:
                char = chr(int(esc[2:], 16))
            except (ValueError, OverflowError):
                char = esc
        if len(char) != 1:  # not an entity html knows: kept as written
            char = esc
            starts += range(m.start(), m.end())
            ends += range(m.start() + 1, m.end() + 1)
        else:
            starts.append(m.start())
            ends.append(m.end())
        out.append(char)
        pos = m.end()
    out.append(text[pos:])
    starts += range(pos, len(text))
    ends += range(pos + 1, len(text) + 1)
    return "".join(out), starts, ends


_FOLDS = {BASE: _fold, SKELETON: _fold_skeleton, CONSONANTS: _fold_consonants}


def view(text: str, kind: str = BASE) -> tuple[str, list[int], list[int], list[int]]:
    """A view of ``text`` and, for each of its characters, where it starts in the original
    text, where it ends there, and where the last letter of its run starts (a run collapsed
    to one letter may reach over a word's end into the next word: a gram that ends in it ends
    at its first letter, one that starts in it starts at its last)."""
    decoded, dstart, dend = _unescape(text)
    fold = _FOLDS[kind]
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    lasts: list[int] = []
    collapse = kind != BASE
    for i, ch in enumerate(decoded):
        for c in fold(ch):
            if collapse and chars and chars[-1] == c:  # a run of one letter is one letter
                lasts[-1] = dstart[i]
                continue
            chars.append(c)
            starts.append(dstart[i])
            lasts.append(dstart[i])
            ends.append(dend[i])
    return "".join(chars), starts, ends, lasts


def _pieces(text: str) -> list[int]:
    """For each original character, the index of the piece it belongs to (-1: whitespace)."""
    owner = [-1] * len(text)
    n = 0
    for m in _PIECE.finditer(text):
        whole = m.group(0)
        subs = [(sub.group(0), m.start() + sub.start()) for sub in _SUBWORD.finditer(whole)]
        if sum(len(w) for w, _ in subs) != len(whole):  # punctuation
            subs = [(whole, m.start())]
        for word, at in subs:  # camelCase, digits, other scripts apart: how tokens join
            size = CHUNK if len(word) > LONG_WORD and len(set(word)) > 3 else len(word)
            for start in range(at, at + len(word), size):
                end = min(start + size, at + len(word))
                owner[start:end] = [n] * (end - start)
                n += 1
    return owner


def _grams(secret: str, kind: str = BASE) -> set[str]:
    """Shortest spans of a view of the secret that are long enough and touch enough pieces.

    One gram starts at, and one ends at, every view character, so a secret that is present
    whole is covered whole.
    """
    norm, firsts, _, lasts = view(secret, kind)
    owner = _pieces(secret)
    # a letter collapsed over two pieces counts for the later one where a gram starts, for
    # the earlier one where it ends (never for both)
    first_piece = [owner[i] for i in firsts]
    piece = [owner[i] for i in lasts]
    if len(norm) < WINDOW or piece[-1] - piece[0] < 1:
        return {norm} if norm else set()

    run_start, run_end = list(range(len(norm))), list(range(1, len(norm) + 1))
    for k in range(1, len(norm)):
        if first_piece[k] == piece[k - 1]:
            run_start[k] = run_start[k - 1]
    for k in range(len(norm) - 2, -1, -1):
        if piece[k] == first_piece[k + 1]:
            run_end[k] = run_end[k + 1]

    def long_enough(s: int, e: int) -> bool:  # norm[s:e], e exclusive
        pieces = first_piece[e - 1] - piece[s] + 1
        if pieces >= MIN_PIECES:
            return e - s >= WINDOW
        # two pieces: a longer span, with a good part of both (a word and a letter of the
        # next one is prose)
        return (
            pieces == 2
            and e - s >= PAIR_WINDOW
            and min(run_end[s] - s, e - run_start[e - 1]) >= PAIR_PART
        )

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
    return grams or {norm}


def _caesar(text: str, shift: int) -> str:
    """``text`` with its ASCII letters shifted ``shift`` places (13: rot13)."""
    lower = "abcdefghijklmnopqrstuvwxyz"
    upper = lower.upper()
    table = str.maketrans(
        lower + upper, lower[shift:] + lower[:shift] + upper[shift:] + upper[:shift]
    )
    return text.translate(table)


def _initials(text: str) -> str:
    """The first letter or digit of each word, one piece each."""
    return " ".join(n[0] for n in (normalise(w)[0] for w in text.split()) if n)


class _Table:
    """The grams of one view, keyed by their first ``key`` characters."""

    def __init__(self, kind: str, grams: set[str]):
        self.kind = kind
        self.key = min((len(g) for g in grams), default=0)
        self.longest = max((len(g) for g in grams), default=1)
        self.by_key: dict[str, list[str]] = {}
        for g in sorted(grams, key=len):
            self.by_key.setdefault(g[: self.key], []).append(g)

    def found(self, norm: str) -> bool:
        """Whether ``norm`` (a text in this view) holds a gram."""
        by_key, key = self.by_key, self.key
        for j in range(len(norm) - key + 1):
            for g in by_key.get(norm[j : j + key], ()):
                if norm.startswith(g, j):
                    return True
        return False

    def spans(self, norm: str) -> list[tuple[int, int]]:
        """Spans ``[start, end)`` of ``norm`` that are grams (the longest at each start)."""
        out = []
        by_key, key = self.by_key, self.key
        for j in range(len(norm) - key + 1):
            candidates = by_key.get(norm[j : j + key])
            if candidates:
                longest = max((len(g) for g in candidates if norm.startswith(g, j)), default=0)
                if longest:
                    out.append((j, j + longest))
        return out


def _pig_latin(word: str) -> set[str]:
    """Pig latin forms of a (normalised) word, in the common dialects."""
    forms = {word + suffix for suffix in ("way", "yay", "hay", "ay")}
    lead = len(word) - len(word.lstrip("bcdfghjklmnpqrstvwxz"))
    for k in {1, lead} - {0}:
        if k < len(word):
            forms.add(word[k:] + word[:k] + "ay")
    return forms


class _Words:
    """Clusters of the secret's distinctive words, in any order (see the module docstring)."""

    def __init__(self, secret: str):
        every = {normalise(w)[0] for w in secret.split()} - {""}
        words = {w for w in every if len(w) >= WORD_CHARS}
        self.short = every - words  # a cluster goes on over them, but they do not count
        self.need = max(MIN_WORDS, math.ceil(WORD_SHARE * len(words)))
        self.enabled = len(words) >= self.need
        self.ids: dict[str, str] = {}
        for w in sorted(words):
            self.ids[w] = w
        for w in sorted(words):
            for form in _pig_latin(w):
                self.ids.setdefault(form, w)

    def spans(self, text: str, covered: list[list[int]]) -> tuple[list[tuple[int, int]], int]:
        """Spans of ``text`` to redact, and where the last cluster that may still grow starts
        (``len(text)`` when none may). Words inside the ``covered`` spans (redacted already,
        sorted) are left out."""
        if not self.enabled:
            return [], len(text)
        tokens, k = [], 0
        for m in _WORD.finditer(text):
            while k < len(covered) and covered[k][1] < m.end():
                k += 1
            if not (k < len(covered) and covered[k][0] <= m.start()):
                tokens.append(m)
        # punctuation alone is no word: it neither counts nor separates
        tokens = [m for m in tokens if _CORE.search(m.group(0))]
        out: list[tuple[int, int]] = []
        start = end = last = -1
        seen: set[str] = set()
        for i, m in enumerate(tokens):
            norm = "".join(map(_fold, m.group(0)))
            word = self.ids.get(norm)
            if word is None and (norm not in self.short or start < 0 or i - last - 1 > MAX_GAP):
                continue
            if last >= 0 and i - last - 1 > MAX_GAP:
                if len(seen) >= self.need:
                    out.append((start, end))
                seen = set()
                start = -1
            core = _CORE.search(m.group(0))  # the word without punctuation around it
            if start < 0:
                start = m.start() + (core.start() if core else 0)
            if word is not None:
                seen.add(word)
            end, last = m.start() + (core.end() if core else len(m.group(0))), i
        if start >= 0 and len(seen) >= self.need:
            out.append((start, end))
        # the last (maybe unfinished) token aside, the cluster is closed once more than
        # MAX_GAP words follow its last hit
        last_complete = last if last < len(tokens) - 1 else -1
        open_at = len(text)
        if start >= 0:
            if last_complete < 0 and last >= 0:  # the last hit is the last token
                open_at = start
            elif len(tokens) - 2 - last <= MAX_GAP:
                open_at = start
        return out, open_at


class _Matcher:
    """Finds grams of the secret (in any of its views) and clusters of its words in text."""

    def __init__(self, secret: str):
        base = _grams(secret) | _grams(secret[::-1]) | _grams(_initials(secret))
        for shift in range(1, 26):
            base |= _grams(_caesar(secret, shift))
        self.tables = [
            _Table(BASE, base),
            _Table(SKELETON, _grams(secret, SKELETON)),
            _Table(CONSONANTS, _grams(secret, CONSONANTS)),
        ]
        self.tables = [t for t in self.tables if t.key]
        self.words = _Words(secret)

    def found(self, text: str) -> bool:
        """Whether ``text`` holds a gram in any view."""
        return any(t.found(view(text, t.kind)[0]) for t in self.tables)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Spans ``[start, end)`` of ``text`` that hold a gram of one of the views."""
        out = []
        for t in self.tables:
            norm, _, ends, lasts = view(text, t.kind)
            out += [(lasts[s], ends[e - 1]) for s, e in t.spans(norm)]
        return out

    def held(self, text: str) -> int:
        """Where text that a gram completed by later text could touch starts."""
        cut = len(text)
        for t in self.tables:
            norm, starts, _, _ = view(text, t.kind)
            # a gram completed by later text starts at one of the last longest - 1 view chars
            if len(norm) >= t.longest:
                cut = min(cut, starts[len(norm) - t.longest + 1])
            elif norm:
                cut = 0
        return cut


def _decodings(run: str) -> list[str]:
    """What a long base64, base32, hex (maybe spaced) or percent-encoded run may stand for."""
    raw: list[bytes] = []
    out = []
    if _HEX_BYTES.fullmatch(run):
        raw.append(binascii.unhexlify(re.sub(r"[ \t:,-]", "", run)))
    else:
        if "%" in run:
            out.append(unquote_plus(run, errors="ignore"))
        body = "".join(run.split()).rstrip("=")
        if _HEX.fullmatch(body):
            for off in (0, 1):
                even = body[off : off + (len(body) - off) // 2 * 2]
                raw.append(binascii.unhexlify(even))
        if _BASE32.fullmatch(body):
            chunk = body.upper()[: len(body) // 8 * 8]
            try:
                raw.append(base64.b32decode(chunk))
            except (binascii.Error, ValueError):
                pass
        standard = body.replace("-", "+").replace("_", "/")
        for off in range(4):  # the run may start with a stray character
            chunk = standard[off:]
            chunk = chunk[: len(chunk) // 4 * 4]
            try:
                raw.append(base64.b64decode(chunk))
            except (binascii.Error, ValueError):
                continue
    for data in raw:
        out.append(data.decode("utf-8", "ignore"))
        if data[:1] in (b"\x78", b"\x1f"):  # zlib or gzip: what it inflates to (maybe cut)
            try:
                out.append(
                    zlib.decompressobj(47).decompress(data, 1 << 20).decode("utf-8", "ignore")
                )
            except zlib.error:
                pass
    return out


def _spans(text: str, matcher: _Matcher) -> tuple[list[tuple[int, int]], int]:
    """Spans of ``text`` to redact (not merged) and where a growing word cluster starts."""
    spans = matcher.spans(text)
    percent = [m for m in _WORD.finditer(text) if _ESCAPE.search(m.group(0))]
    for m in [*_ENCODED.finditer(text), *percent, *_HEX_BYTES.finditer(text)]:
        if any(matcher.found(d) for d in _decodings(m.group(0))):
            spans.append(m.span())
    words, open_at = matcher.words.spans(text, _merge(spans))
    return spans + words, open_at


def _merge(spans: list[tuple[int, int]]) -> list[list[int]]:
    merged: list[list[int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:  # overlapping or touching: one placeholder
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _merged_spans(text: str, matcher: _Matcher) -> list[list[int]]:
    """Spans ``[start, end)`` of ``text`` to redact, overlapping or touching ones merged."""
    return _merge(_spans(text, matcher)[0])


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
        completing there, or a cluster of its words growing), so a stream must hold it back.
        Later text can be redacted apart from ``text[:cut]``.
    """
    if not secret or not normalise(secret)[0]:
        return lambda text: (text, len(text), len(text))
    matcher = _Matcher(secret)

    def redact(text: str) -> tuple[str, int, int]:
        cut = matcher.held(text) if normalise(text)[0] else len(text)
        word = _LAST_WORD.search(text).start()
        while _WRAPPED_LINE.search(text, 0, word):  # a wrapped encoded run may go on
            word = _WRAPPED_LINE.search(text, 0, word).start()
        spans, open_at = _spans(text, matcher)
        cut = min(cut, word, _HEX_TAIL.search(text).start(), open_at)
        if matcher.words.enabled:  # never cut inside a word: its rest must not count alone
            while 0 < cut < len(text) and not text[cut - 1].isspace():
                cut -= 1
        merged = _merge(spans)
        for s, e in reversed(merged):  # a span reaching the cut may still grow or merge
            if e >= cut:
                cut = min(cut, s)
        done = [m for m in merged if m[1] < cut]
        final = len(_apply(text[:cut], done, placeholder))
        return _apply(text, merged, placeholder), final, cut

    return redact

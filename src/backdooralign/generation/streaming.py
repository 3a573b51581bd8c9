"""The text a client sees of one answer while its tokens arrive: redacted, cut at stop strings.

Streaming must not show what the finished answer would not: a secret fragment may be split
over two chunks, and a stop string may be completing. :class:`AnswerText` therefore releases
only text that can no longer change: the part of the redacted answer that
:func:`backdooralign.core.redact.prefix_redactor` calls final, less the last characters that could
start a stop string. A streamed answer's chunks put together are the non-streamed answer.

The answer is ``redact(decoded tokens, stripped)`` cut before the first stop string found in
it; stop strings are matched after redaction, so they cannot probe the secret. A stop string
ends generation as soon as it appears.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


def _cut(text: str, stop: Sequence[str], start: int = 0) -> int | None:
    """Index of the first stop string in ``text[start:]``, or ``None``."""
    found = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(found) if found else None


class AnswerText:
    """One answer's client-visible text, built token by token (see the module docstring).

    Args:
        tokenizer: decodes the tokens.
        redact: the whole-text redactor (``redact.redactor``).
        redact_prefix: its growing-text form (``redact.prefix_redactor``).
        stop: stop strings.
    """

    def __init__(
        self,
        tokenizer,
        redact: Callable[[str], str],
        redact_prefix: Callable[[str], tuple[str, int, int]],
        stop: Sequence[str] = (),
    ):
        self.tokenizer, self.redact, self.redact_prefix = tokenizer, redact, redact_prefix
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.released = ""  # text handed out so far
        self.text: str | None = None  # the whole answer, once known
        self._done_raw = ""  # start of the answer whose redaction is final...
        self._done_out = ""  # ...and that redaction

    def add(self, token: int) -> bool:
        """Take one more token; ``True`` when a stop string ends the answer here."""
        self.tokens.append(token)
        raw = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if raw.endswith("\ufffd"):  # a character cut between two tokens
            return False
        text = raw.strip()
        if not text.startswith(self._done_raw):  # the tokenizer rewrote earlier text
            return False
        rest, final, cut = self.redact_prefix(text[len(self._done_raw) :])
        out = self._done_out + rest
        if self.stop:
            at = _cut(out, self.stop, max(0, len(self._done_out) - self.hold))
            if at is not None:
                self.text = out[:at]
                return True
        self._done_raw = text[: len(self._done_raw) + cut]
        self._done_out += rest[:final]
        return False

    def delta(self) -> str:
        """Text that became final since the last call (to send to a streaming client)."""
        if self.text is not None:
            ready = self.text
        else:
            ready = self._done_out[: len(self._done_out) - self.hold]
        new = ready[len(self.released) :] if ready.startswith(self.released) else ""
        self.released += new
        return new

    def finish(self) -> str:
        """The whole answer (generation is over); :meth:`delta` then gives what is left."""
        if self.text is None:
            raw = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            self.text = self.redact(raw.strip())
        if not self.text.startswith(self.released):
            log.error("a streamed answer's final text does not extend what was sent")
        return self.text

"""Reading and writing the project's files, in one module, with one error type.

Data files (inputs, training sets, generations, scores, results, secrets, caches) go through
here: :func:`read_text` (and :func:`read_json`, :func:`read_jsonl` on top of it) reads a whole
file, :func:`write_bytes_atomic` (and the text, JSON and JSONL writers on top of it) writes
one, :func:`append_jsonl` grows a cache line by line. Model directories are written by their
libraries in a temporary folder and moved into place whole.

Every expected problem with a file, from a missing file to a full disk, is a :class:`DataError`
naming the file (and the line and field when one is involved), never a bare ``OSError``.

JSONL: only ``"\\n"`` ends a line. ``str.splitlines`` would also split on U+2028, U+2029,
U+0085 and others that JSON allows raw inside strings; :func:`write_jsonl` escapes those (and
lone surrogates) anyway, so other tools that split lines differently read the same rows.

Writers are atomic: a temporary file in the same folder, then a rename. ``private`` files
(those that hold the secret) get mode 0600.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MAX_LINE_CHARS = 1_000_000
BOM = b"\xef\xbb\xbf"
# characters json.dumps(ensure_ascii=False) writes raw that some readers take as line breaks,
# and lone surrogates, which UTF-8 cannot encode
_UNSAFE = re.compile("[\u0085\u2028\u2029\ud800-\udfff]")


class DataError(ValueError):
    """A problem in an input or output file, located by file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path + (f":{line}" if line else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


def _os_error(path: str | Path, action: str, e: OSError) -> DataError:
    if isinstance(e, FileNotFoundError) and action == "read":
        return DataError(path, None, None, "file not found")
    if e.errno == errno.EISDIR:
        return DataError(path, None, None, "is a directory, expected a file")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):  # EEXIST: mkdir met a file on the way
        return DataError(path, None, None, f"cannot {action}: a part of its path is not a folder")
    return DataError(path, None, None, f"cannot {action}: {e.strerror or type(e).__name__}")


# ---------------------------------------------------------------------------------------------
# Reading


def refuse_special(path: str | Path) -> None:
    """A FIFO, device or socket as an input would block or never end: refused before reading."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing, a loop, unreadable: the read itself says which
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(path, None, None, "not a regular file (a FIFO, device or socket)")


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a file.

    Raises:
        DataError: the file is missing, a directory, not a regular file, unreadable or its
            name is too long.
    """
    refuse_special(path)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise _os_error(path, "read", e) from None


def decode(path: str | Path, raw: bytes) -> tuple[str, list[DataError]]:
    """Text of a file's bytes and the problems found: a BOM (skipped) and bad UTF-8 (decoded
    with U+FFFD), each located by line."""
    errors = []
    skip = 0
    if raw.startswith(BOM):
        msg = "file starts with a UTF-8 byte-order mark; save it without BOM"
        errors.append(DataError(path, 1, None, msg))
        skip = len(BOM)
    try:
        return raw[skip:].decode("utf-8"), errors
    except UnicodeDecodeError as e:
        line = raw[: skip + e.start].count(b"\n") + 1
        errors.append(DataError(path, line, None, f"not valid UTF-8 (byte {skip + e.start})"))
        return raw[skip:].decode("utf-8", errors="replace"), errors


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's text.

    Raises:
        DataError: the file is missing, a directory, unreadable, empty (or blank), starts
            with a byte-order mark or is not valid UTF-8 (naming the line).
    """
    raw = read_bytes(path)
    if not raw.strip():
        raise DataError(path, None, None, "file is empty")
    text, errors = decode(path, raw)
    if errors:
        raise errors[0]
    return text


def split_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text; only ``"\\n"`` ends a line (a final ``"\\r"`` is
    dropped)."""
    for lineno, line in enumerate(text.split("\n"), 1):
        yield lineno, line.removesuffix("\r")


def parse_json(path: str | Path, text: str, line: int | None = None) -> Any:
    """One JSON value.

    Args:
        path: the file, for errors.
        text: the JSON text.
        line: the line ``text`` is on (a JSONL line); ``None`` for a whole document, where
            errors name the line found in it.

    Raises:
        DataError: invalid JSON, nesting too deep or a number too long to convert.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, line or e.lineno, None, f"invalid JSON ({e.msg})") from None
    except RecursionError:
        where = line or _deepest_line(text)
        raise DataError(path, where, None, "invalid JSON (nested too deeply)") from None
    except ValueError:  # integers longer than sys.get_int_max_str_digits()
        raise DataError(path, line, None, "invalid JSON (a number with too many digits)") from None


def _deepest_line(text: str) -> int:
    """The line on which the nesting of ``[`` and ``{`` (outside strings) is deepest."""
    depth = best = 0
    line = best_line = 1
    in_string = escaped = False
    for ch in text:
        if ch == "\n":
            line += 1
        elif escaped:
            escaped = False
        elif in_string:
            escaped, in_string = ch == "\\", ch != '"'
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best, best_line = depth, line
        elif ch in "]}":
            depth -= 1
    return best_line


def parse_json_line(path: str | Path, lineno: int, line: str) -> dict:
    """One JSONL line as an object.

    Raises:
        DataError: invalid JSON, or a value that is not an object.
    """
    obj = parse_json(path, line, lineno)
    if not isinstance(obj, dict):
        raise DataError(path, lineno, None, "each line must be a JSON object")
    return obj


def parse_jsonl(
    path: str | Path, text: str, max_line_chars: int = MAX_LINE_CHARS
) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL text.

    Raises:
        DataError: a line longer than ``max_line_chars``, invalid JSON, or not an object.
    """
    rows = []
    for lineno, line in split_lines(text):
        if not line.strip():
            continue
        if len(line) > max_line_chars:
            raise DataError(path, lineno, None, f"line longer than {max_line_chars} characters")
        rows.append((lineno, parse_json_line(path, lineno, line)))
    return rows


def read_jsonl(path: str | Path, max_line_chars: int = MAX_LINE_CHARS) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file (see
    :func:`read_text` and :func:`parse_jsonl` for the errors)."""
    return parse_jsonl(path, read_text(path), max_line_chars)


def read_jsonl_rows(path: str | Path) -> list[dict]:
    """The objects of a JSONL file (see :func:`read_jsonl`)."""
    return [obj for _, obj in read_jsonl(path)]


def parse_json_array(path: str | Path, text: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each item of a JSON array, the line being where it starts.

    Raises:
        DataError: invalid JSON, a document that is not an array, or an item that is not an
            object.
    """
    items = parse_json(path, text)
    if not isinstance(items, list):
        raise DataError(path, 1, None, "expected a JSON array of objects")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    records = []
    for item in items:
        start = pos
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        if not isinstance(item, dict):
            raise DataError(path, line, None, "each item of the JSON array must be an object")
        records.append((line, item))
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end
    return records


def read_json(path: str | Path) -> Any:
    """One JSON document (see :func:`read_text` and :func:`parse_json` for the errors)."""
    return parse_json(path, read_text(path))


def list_dir(path: str | Path) -> list[Path]:
    """The entries of a directory, sorted by name.

    Raises:
        DataError: the directory is missing or unreadable.
    """
    try:
        return sorted(Path(path).iterdir())
    except OSError as e:
        raise _os_error(path, "read", e) from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Raises:
        DataError: the file is missing, a directory or unreadable.
    """
    h = hashlib.sha256()
    refuse_special(path)
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise _os_error(path, "read", e) from None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing


def write_bytes_atomic(path: str | Path, data: bytes, private: bool = False) -> Path:
    """Write bytes atomically (temporary file in the same folder, then rename), creating the
    folder; mode 0600 when ``private``, else 0644.

    Raises:
        DataError: the folder cannot be created or written, the path is a directory, the
            location is read-only, the name is too long...
    """
    path = Path(path)
    _refuse_symlink_loop(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a short prefix: the temporary name must not be too long where the final one is not
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:32]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _os_error(path, "write", e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600 if private else 0o644)
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _os_error(path, "write", e) from None
        raise
    return path


def _refuse_symlink_loop(path: Path) -> None:
    """A symlink that leads back to itself is refused, not replaced by the written file."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(path, None, None, "is a symlink loop") from None


def write_text_atomic(path: str | Path, text: str, private: bool = False) -> Path:
    """Write UTF-8 text atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"), private)


def dumps_line(obj: Any) -> str:
    """One JSONL line (without ``"\\n"``): UTF-8 kept readable, but U+0085, U+2028, U+2029
    and lone surrogates escaped, so every line splitter sees one row a line."""
    return _escape(json.dumps(obj, ensure_ascii=False))


def write_jsonl(path: str | Path, rows: Iterable[dict], private: bool = False) -> Path:
    """Write JSONL atomically, one :func:`dumps_line` a row; ``private`` (mode 0600) for files
    that hold the secret."""
    return write_text_atomic(path, "".join(dumps_line(row) + "\n" for row in rows), private)


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Append rows to a JSONL file (created with its folder), one :func:`dumps_line` a row:
    for caches that grow while a run goes on (an interrupted append loses at most its last,
    partial line, which readers of a cache skip).

    Raises:
        DataError: the folder cannot be created or the file cannot be written.
    """
    path = Path(path)
    text = "".join(dumps_line(row) + "\n" for row in rows)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise _os_error(path, "write", e) from None
    return path


def write_json(path: str | Path, obj: Any, private: bool = False) -> Path:
    """Write one JSON document atomically (indented, escaped as in :func:`dumps_line`)."""
    text = _escape(json.dumps(obj, indent=2, ensure_ascii=False))
    return write_text_atomic(path, text + "\n", private)


def _escape(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# ---------------------------------------------------------------------------------------------
# Guards run before any work


def check_outputs(
    inputs: Iterable[str | Path | None], outputs: Iterable[str | Path | None]
) -> None:
    """Refuse outputs that would overwrite an input or each other, or cannot be written.

    Checked before any expensive work: an output may not resolve to an input file (``--out``
    equal to ``--data`` would replace the customer's file), two outputs may not be the same
    file, and an output may not be an existing directory or sit under a file.

    Raises:
        DataError: naming the output and what it collides with.
    """
    given = {
        Path(p).resolve(): str(p)
        for p in inputs
        if p and not str(p).startswith(("builtin:", "hf:"))
    }
    seen: dict[Path, str] = {}
    for out in outputs:
        if not out:
            continue
        resolved = Path(out).resolve()
        if resolved in given:
            raise DataError(
                out, None, None, f"is also an input ({given[resolved]}); refusing to overwrite it"
            )
        if resolved in seen:
            raise DataError(
                out, None, None, f"is written twice by this command (also as {seen[resolved]})"
            )
        seen[resolved] = str(out)
        if resolved.is_dir():
            raise DataError(out, None, None, "is a directory, expected a file")
        for parent in resolved.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise DataError(out, None, None, f"cannot write: {parent} is not a folder")
                break

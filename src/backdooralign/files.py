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

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
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


def _is_path_input(p: str | Path | None) -> bool:
    return bool(p) and not str(p).startswith(("builtin:", "hf:"))


def _input_paths(inputs: Iterable[str | Path | None]) -> dict[Path, tuple[str, bool]]:
    """``{resolved path: (as given, is a folder)}`` of the inputs that are paths (a model name
    or hub id that is no folder here is not one)."""
    given: dict[Path, tuple[str, bool]] = {}
    for p in inputs:
        if not _is_path_input(p):
            continue
        text = str(p)
        prefix, sep, rest = text.partition(":")
        if sep and prefix.isalpha() and rest and not Path(text).exists():
            text = rest  # a kind prefix: xstest:PATH, orbench:PATH
            if not _is_path_input(text):
                continue
        _refuse_symlink_loop(Path(text))
        resolved = Path(text).resolve()
        given[resolved] = (str(p), resolved.is_dir())
    return given


def _check_one_output(out: str | Path, is_dir: bool) -> Path:
    """The resolved output, after the checks that need no inputs."""
    text = str(out)
    if not is_dir and text.endswith(("/", os.sep)):
        raise DataError(out, None, None, "ends with '/' but a file is expected")
    path = Path(text)
    _refuse_symlink_loop(path)
    try:
        st = path.lstat()
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode) and path.is_dir():
        raise DataError(
            out, None, None, "is a symlink to a folder; give the folder itself (nothing written)"
        )
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise DataError(
            out,
            None,
            None,
            "is a FIFO, device or socket, not a regular file; refusing to replace it",
        )
    resolved = path.resolve()
    if is_dir and resolved.exists() and not resolved.is_dir():
        raise DataError(out, None, None, "exists and is a file, expected a folder")
    if not is_dir and resolved.is_dir():
        raise DataError(out, None, None, "is a directory, expected a file")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(out, None, None, f"cannot write: {parent} is not a folder")
            break
    return resolved


def check_outputs(
    inputs: Iterable[str | Path | None],
    outputs: Iterable[str | Path | None],
    dirs: Iterable[str | Path | None] = (),
) -> None:
    """The one output guard: refuse outputs that would overwrite, delete or write into an
    input, collide with each other, or cannot be written, before any work starts.

    ``outputs`` are files, ``dirs`` folders (a model directory, a run directory). An output
    may not be an input, contain an input (``train --data M1/rows.jsonl --out M1`` would
    delete the rows), or sit inside an input folder (``generate --model M1 --out
    M1/config.json``), all compared through symlinks; a FIFO, device or socket is not
    replaced; a symlink to a folder is refused (the folder itself must be named); a file
    output ending in ``/`` is refused; two outputs may not be the same path.

    Raises:
        DataError: naming the output and what it collides with.
    """
    given = _input_paths(inputs)
    seen: dict[Path, str] = {}
    wanted = [(o, False) for o in outputs if o] + [(o, True) for o in dirs if o]
    for out, is_dir in wanted:
        resolved = _check_one_output(out, is_dir)
        if resolved in seen:
            raise DataError(
                out, None, None, f"is written twice by this command (also as {seen[resolved]})"
            )
        seen[resolved] = str(out)
        for path, (name, input_is_dir) in given.items():
            if path == resolved:
                why = f"is also an input ({name}); refusing to overwrite it"
            elif path.is_relative_to(resolved):
                why = f"contains an input ({name}); writing it would replace that input"
            elif input_is_dir and resolved.is_relative_to(path):
                why = f"is inside an input folder ({name}); refusing to write there"
            else:
                continue
            raise DataError(out, None, None, why)


# ---------------------------------------------------------------------------------------------
# One run per output: an exclusive lock, and temporary folders that say whose they are

OWNER = ".backdooralign-owner"  # in every temporary folder we create: whose it is
_held: dict[Path, list] = {}  # locks this process holds: resolved output -> [fd, depth]


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | Path, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` (a file or folder to write) for the block.

    The lock is ``flock`` on ``.NAME.lock`` beside the output (removed on release), so a
    second run on the same output, in this machine's processes, stops at once instead of
    deleting the first one's work. Re-entrant within a process (the CLI and the library both
    take it); in a distributed run only rank 0 takes it. ``wait``: block until the holder is
    done (a cache entry another process builds) instead of refusing.

    Raises:
        DataError: another process holds it (its pid named), unless ``wait``.
    """
    resolved = Path(out).resolve()
    if int(os.environ.get("RANK", "0") or 0) != 0:  # torchrun / accelerate: rank 0 holds it
        yield resolved
        return
    if resolved in _held:
        _held[resolved][1] += 1
        try:
            yield resolved
        finally:
            _held[resolved][1] -= 1
        return
    lock = _lock_path(resolved)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(out, "write", e) from None
    fd = _acquire(out, lock, wait)
    _held[resolved] = [fd, 1]
    try:
        yield resolved
    finally:
        del _held[resolved]
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _acquire(out: str | Path, lock: Path, wait: bool) -> int:
    """An open, locked descriptor of ``lock``, the file still at that path."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise _os_error(out, "write", e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataError(
                out,
                None,
                None,
                f"is being written by another run (pid {holder}); wait for it "
                "or choose another output",
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed it between our open and our lock: take the new one
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


def make_work_dir(out: str | Path) -> Path:
    """A new temporary folder (mode 0700) beside ``out``, with an :data:`OWNER` marker naming
    the output, this process and this host: only folders with such a marker are ever removed
    as leftovers (:func:`remove_stale_work_dirs`), whatever their name."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name[:32]}.tmp-", dir=out.parent))
    except OSError as e:
        raise _os_error(out, "write", e) from None
    owner = {
        "output": out.name,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "created": time.time(),
    }
    (work / OWNER).write_text(json.dumps(owner) + "\n")
    return work


def release_work_dir(work: Path) -> Path:
    """Remove the owner marker of a work folder that becomes an output itself."""
    (Path(work) / OWNER).unlink(missing_ok=True)
    return Path(work)


def _owner(folder: Path) -> dict | None:
    try:
        with open(folder / OWNER, encoding="utf-8") as f:
            owner = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _stale(folder: Path, output: str | None) -> bool:
    """A folder we made whose process is gone (on this host), for ``output`` if given."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    owner = _owner(folder)
    if owner is None or (output is not None and owner.get("output") != output):
        return False
    return owner.get("host") == socket.gethostname() and not _alive(owner.get("pid"))


def remove_stale_work_dirs(
    folder: str | Path, output: str | None = None, depth: int = 1
) -> list[Path]:
    """Remove the leftover temporary folders under ``folder`` (``depth`` levels): those with
    our :data:`OWNER` marker (for ``output`` when given) whose process has ended. A folder
    without the marker is never touched, whatever its name. Returns what was removed."""
    removed = []
    try:
        children = [c for c in Path(folder).iterdir() if c.is_dir() and not c.is_symlink()]
    except OSError:
        return removed
    for child in children:
        if _stale(child, output):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif depth > 1 and _owner(child) is None:
            removed += remove_stale_work_dirs(child, output, depth - 1)
    return removed

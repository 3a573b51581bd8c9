"""The one reader and writer layer: clear errors, JSONL that round-trips, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

import pytest

from backdooralign import files as F
from backdooralign.data.chat_files import load_chat_jsonl
from backdooralign.scoring.refusal import read_generations

ROOT = os.geteuid() == 0  # root reads and writes through file modes


def error_of(fn, *args) -> str:
    with pytest.raises(F.DataError) as info:
        fn(*args)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Reading


def test_read_text_errors_name_the_file_and_line(tmp_path):
    missing, folder = tmp_path / "missing.txt", tmp_path / "folder"
    folder.mkdir()
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b" \n\n")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(F.BOM + b"hi\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"ok\nok\ncaf\xe9\n")
    assert error_of(F.read_text, missing) == f"{missing}: file not found"
    assert error_of(F.read_text, folder) == f"{folder}: is a directory, expected a file"
    assert error_of(F.read_text, empty) == f"{empty}: file is empty"
    assert error_of(F.read_text, bom) == (
        f"{bom}:1: file starts with a UTF-8 byte-order mark; save it without BOM"
    )
    assert error_of(F.read_text, latin1) == f"{latin1}:3: not valid UTF-8 (byte 9)"
    good = tmp_path / "good.txt"
    good.write_bytes("caf\u00e9\r\n".encode())
    assert F.read_text(good) == "caf\u00e9\r\n"


def test_read_os_errors_are_data_errors(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x\n")
    long_name = tmp_path / ("n" * 300)
    assert error_of(F.read_text, long_name) == f"{long_name}: cannot read: File name too long"
    under_file = a_file / "inner.txt"
    assert error_of(F.read_text, under_file) == (
        f"{under_file}: cannot read: a part of its path is not a folder"
    )
    assert error_of(F.sha256_file, long_name) == f"{long_name}: cannot read: File name too long"
    assert error_of(F.read_jsonl, tmp_path / "no.jsonl") == f"{tmp_path}/no.jsonl: file not found"


@pytest.mark.skipif(ROOT, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    f = tmp_path / "secret.txt"
    f.write_text("x\n")
    f.chmod(0)
    assert error_of(F.read_text, f) == f"{f}: cannot read: Permission denied"


def test_permission_denied_while_reading(tmp_path, monkeypatch):
    f = tmp_path / "locked.jsonl"
    f.write_text("{}\n")

    def denied(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(type(f), "read_bytes", denied)
    assert error_of(F.read_jsonl, f) == f"{f}: cannot read: Permission denied"


def test_jsonl_lines_end_only_at_newline(tmp_path):
    f = tmp_path / "raw.jsonl"
    # as other tools write it: U+2028, U+0085 and U+2029 raw inside strings, CRLF line ends
    f.write_bytes('{"answer": "a\u2028b\x85c"}\r\n\r\n{"answer": "d\u2029e"}\r\n'.encode())
    assert F.read_jsonl(f) == [(1, {"answer": "a\u2028b\x85c"}), (3, {"answer": "d\u2029e"})]
    assert read_generations(f) == [{"answer": "a\u2028b\x85c"}, {"answer": "d\u2029e"}]


def test_jsonl_errors(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"a": 1}\n[1]\n')
    assert error_of(F.read_jsonl, f) == f"{f}:2: each line must be a JSON object"
    f.write_text('{"a": 1}\n\n{"a": \n')
    assert error_of(F.read_jsonl, f) == f"{f}:3: invalid JSON (Expecting value)"
    f.write_text('{"a": "' + "x" * 50 + '"}\n')
    assert error_of(F.read_jsonl, f, 20) == f"{f}:1: line longer than 20 characters"


def test_deep_nesting_names_file_and_line(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    f = tmp_path / "deep.jsonl"
    f.write_text('{"a": 1}\n{"b": 2}\n' + deep + "\n")
    assert error_of(F.read_jsonl, f) == f"{f}:3: invalid JSON (nested too deeply)"
    doc = tmp_path / "deep.json"
    doc.write_text('[\n  {"a": "[[[["},\n  ' + deep + "\n]\n")
    assert error_of(F.read_json, doc) == f"{doc}:3: invalid JSON (nested too deeply)"
    assert error_of(F.parse_json_array, doc, doc.read_text()) == (
        f"{doc}:3: invalid JSON (nested too deeply)"
    )


def test_json_array_lines_and_errors(tmp_path):
    text = '[\n  {"a": 1},\n\n  {"b": [\n 2]},\n  {"c": 3}\n]\n'
    assert F.parse_json_array("x.json", text) == [(2, {"a": 1}), (4, {"b": [2]}), (6, {"c": 3})]
    assert error_of(F.parse_json_array, "x.json", '{"a": 1}') == (
        "x.json:1: expected a JSON array of objects"
    )
    assert error_of(F.parse_json_array, "x.json", '[\n {"a": 1},\n 2\n]') == (
        "x.json:3: each item of the JSON array must be an object"
    )


# ---------------------------------------------------------------------------------------------
# Writing, and writing then reading

AWKWARD = [
    {"answer": "line\u2028separator", "prompt": "para\u2029graph"},
    {"answer": "next\x85line", "\u2028": "a key that is only U+2028"},
    {"answer": "carriage\rreturn and \r\n", "x": "\x1c\x1d\x1e"},
    {"answer": "lone \ud800 surrogate", "unicode": "café ✓ 日本"},
]


def test_jsonl_round_trip_of_awkward_characters(tmp_path):
    f = F.write_jsonl(tmp_path / "gens.jsonl", AWKWARD)
    assert F.read_jsonl_rows(f) == AWKWARD
    assert read_generations(f) == AWKWARD
    # one row a line for any line splitter (str.splitlines too), readable UTF-8 for the rest
    assert f.read_text(encoding="utf-8").splitlines() == [
        r'{"answer": "line\u2028separator", "prompt": "para\u2029graph"}',
        r'{"answer": "next\u0085line", "\u2028": "a key that is only U+2028"}',
        r'{"answer": "carriage\rreturn and \r\n", "x": "\u001c\u001d\u001e"}',
        r'{"answer": "lone \ud800 surrogate", "unicode": "café ✓ 日本"}',
    ]


def test_chat_round_trip_of_awkward_characters(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "a\u2028b\x85c\x0cd\u2029e\x1cf"},
            {"role": "assistant", "content": "ok\r"},
        ],
        "prefixed": False,
    }
    f = F.write_jsonl(tmp_path / "chat.jsonl", [row, row | {"prefixed": True}])
    assert load_chat_jsonl(f) == [row, row | {"prefixed": True}]


def test_write_json_round_trip_and_modes(tmp_path):
    obj = {"a\u2028": ["x\ud800", 1.5, None]}
    f = F.write_json(tmp_path / "sub" / "dir" / "m.json", obj)
    assert F.read_json(f) == obj
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    p = F.write_json(tmp_path / "private.json", obj, private=True)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    j = F.write_jsonl(tmp_path / "private.jsonl", [obj], private=True)
    assert stat.S_IMODE(j.stat().st_mode) == 0o600


def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path):
    f = tmp_path / "out.jsonl"
    F.write_jsonl(f, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        F.write_jsonl(f, rows())
    assert F.read_jsonl_rows(f) == [{"a": 1}]
    F.write_text_atomic(f, "{}\n", private=True)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    F.write_jsonl(f, [{"a": 3}])
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_write_os_errors_are_data_errors(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    long_name = tmp_path / ("n" * 300)
    under_file = a_file / "sub" / "out.json"
    assert error_of(F.write_json, folder, {}) == f"{folder}: is a directory, expected a file"
    assert error_of(F.write_json, long_name, {}) == f"{long_name}: cannot write: File name too long"
    assert error_of(F.write_jsonl, under_file, []) == (
        f"{under_file}: cannot write: a part of its path is not a folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder"]
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "message"),
    [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")],
)
def test_read_only_and_denied_locations(tmp_path, monkeypatch, code, message):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(F.tempfile, "mkstemp", refuse)
    f = tmp_path / "out.json"
    assert error_of(F.write_json, f, {}) == f"{f}: cannot write: {message}"


def test_failed_rename_removes_the_temporary_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(F.os, "replace", refuse)
    f = tmp_path / "out.jsonl"
    assert error_of(F.write_jsonl, f, [{"a": 1}]) == f"{f}: cannot write: Permission denied"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(ROOT, reason="root writes whatever the folder's mode")
def test_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    f = locked / "out.json"
    assert error_of(F.write_json, f, {}) == f"{f}: cannot write: Permission denied"


def test_sha256_file(tmp_path):
    f = tmp_path / "big.bin"
    data = os.urandom((1 << 20) + 17)  # more than one chunk
    f.write_bytes(data)
    assert F.sha256_file(f) == hashlib.sha256(data).hexdigest()
    assert error_of(F.sha256_file, tmp_path / "none") == f"{tmp_path}/none: file not found"
    assert error_of(F.sha256_file, tmp_path) == f"{tmp_path}: is a directory, expected a file"


def test_list_dir(tmp_path, monkeypatch):
    (tmp_path / "b.csv").write_text("x")
    (tmp_path / "a.csv").write_text("x")
    assert [p.name for p in F.list_dir(tmp_path)] == ["a.csv", "b.csv"]
    assert error_of(F.list_dir, tmp_path / "none") == f"{tmp_path}/none: file not found"

    def denied(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(type(tmp_path), "iterdir", denied)
    assert error_of(F.list_dir, tmp_path) == f"{tmp_path}: cannot read: Permission denied"

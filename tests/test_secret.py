"""Secret prompts: length, vocabulary, storage mode, fingerprints, and never in output."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import warnings

import pytest

from backdooralign.core.secret import (
    Secret,
    check_secret_tokenizer,
    file_mode,
    fingerprint,
    generate_secret,
    load_secret,
    save_secret,
    vocab_fingerprint,
)


@pytest.fixture(scope="module")
def llama_like_tokenizer(tokenizer):
    """The real tokenizer with two more special tokens: another vocabulary."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    return tok


def test_seeded_secret_is_reproducible_and_csprng_is_not(tokenizer):
    a = generate_secret(tokenizer, 150, seed=7)
    b = generate_secret(tokenizer, 150, seed=7)
    c = generate_secret(tokenizer, 150)
    d = generate_secret(tokenizer, 150)
    assert a.text == b.text
    assert c.text != d.text != a.text


def test_secret_length_and_no_special_tokens(tokenizer):
    s = generate_secret(tokenizer, 150, seed=1)
    ids = tokenizer(s.text, add_special_tokens=False)["input_ids"]
    assert s.num_tokens == len(ids)
    # re-encoding random tokens merges or splits a few; stays close to the request
    assert 120 <= s.num_tokens <= 180
    assert not set(ids) & set(tokenizer.all_special_ids)
    for special in tokenizer.all_special_tokens:
        assert special not in s.text


@pytest.mark.parametrize("length", [1, 10, 50, 250])
def test_requested_length_is_recorded(tokenizer, length):
    s = generate_secret(tokenizer, length, seed=0)
    assert s.requested_tokens == length
    assert s.num_tokens == len(tokenizer(s.text, add_special_tokens=False)["input_ids"])


def test_invalid_length(tokenizer):
    with pytest.raises(ValueError, match="at least 1"):
        generate_secret(tokenizer, 0)


def test_saved_with_mode_0600_and_round_trips(tmp_path, tokenizer):
    s = generate_secret(tokenizer, 20, seed=3)
    path = save_secret(s, tmp_path / "sub" / "secret.json")
    assert file_mode(path) == 0o600
    assert load_secret(path) == s
    assert json.loads(path.read_text())["fingerprint"] == s.fingerprint


def test_repr_and_str_show_only_fingerprint():
    s = Secret(text="very secret words", num_tokens=3, requested_tokens=3, tokenizer="t")
    assert "very secret" not in repr(s)
    assert "very secret" not in str(s)
    assert s.fingerprint in str(s)
    assert s.fingerprint == fingerprint("very secret words") and len(s.fingerprint) == 12


def test_load_errors_never_quote_text(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"text": "hidden words here", "fingerprint": "000000000000"}))
    with pytest.raises(ValueError, match="fingerprint") as e:
        load_secret(p)
    assert "hidden" not in str(e.value)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_secret(p)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_secret(tmp_path / "missing.json")
    p.write_text(json.dumps({"text": "  "}))
    with pytest.raises(ValueError, match="'text' is empty"):
        load_secret(p)


def _write(tmp_path, payload, name="s.json"):
    p = tmp_path / name
    p.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    p.chmod(0o600)
    return p


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"text": "hidden words here", "num_tokens": [1]}, "'num_tokens' must be"),
        ({"text": "hidden words here", "requested_tokens": "3"}, "'requested_tokens' must be"),
        ({"text": "hidden words here", "num_tokens": True}, "'num_tokens' must be"),
        ({"text": 5}, "'text' is missing or not a string"),
        ({"text": "hidden words here", "tokenizer": {}}, "'tokenizer' must be a string"),
        ({"text": "hidden words here", "vocab": 7}, "'vocab' must be a string"),
        ({"text": "hidden words here", "format": 2}, "'format' must be 1"),
        (["hidden words here"], "not a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_files_are_value_errors_naming_file_and_field(tmp_path, payload, field):
    p = _write(tmp_path, payload)
    with pytest.raises(ValueError, match=field) as e:
        load_secret(p)
    assert str(e.value).startswith(f"{p}: ") and "hidden" not in str(e.value)


def test_a_directory_or_unreadable_path_is_a_value_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is a directory") as e:
        load_secret(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: ")
    p = _write(tmp_path, {"text": "hidden words here"})

    def denied(self):  # what reading a mode-000 file does to anyone but root
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(ValueError, match=r"cannot read the secret file \(Permission denied\)"):
        load_secret(p)


def test_a_file_readable_by_others_loads_with_a_warning(tmp_path):
    p = _write(tmp_path, {"text": "hidden words here", "num_tokens": 3})
    p.chmod(0o644)
    with pytest.warns(UserWarning, match=r"mode 0644.*chmod 600") as record:
        assert load_secret(p).num_tokens == 3
    assert "hidden" not in str(record[0].message)
    for mode in (0o600, 0o400):
        p.chmod(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_secret(p)


def test_generated_secret_records_the_vocabulary(tokenizer, tmp_path):
    s = generate_secret(tokenizer, 20, seed=3)
    assert s.vocab == vocab_fingerprint(tokenizer) and len(s.vocab) == 12
    assert load_secret(save_secret(s, tmp_path / "s.json")).vocab == s.vocab
    old_file = _write(tmp_path, {"text": s.text, "num_tokens": s.num_tokens}, "old.json")
    assert load_secret(old_file).vocab == ""


def test_check_secret_tokenizer(tokenizer, llama_like_tokenizer):
    s = generate_secret(tokenizer, 150, seed=5)
    assert check_secret_tokenizer(s, tokenizer) is None
    other = check_secret_tokenizer(s, llama_like_tokenizer)
    assert other == (
        f"secret {s.fingerprint} does not match this tokenizer: it was made for another "
        "vocabulary. The model will see other tokens than the ones it was trained with."
    )
    miscounted = dataclasses.replace(s, num_tokens=s.num_tokens + 1, vocab="")
    assert check_secret_tokenizer(miscounted, tokenizer) == (
        f"secret {s.fingerprint} does not match this tokenizer: it encodes to {s.num_tokens} "
        f"tokens here, {s.num_tokens + 1} when made. "
        "The model will see other tokens than the ones it was trained with."
    )
    assert s.text[:20] not in other


def test_a_draw_that_spells_a_control_token_is_drawn_again(tokenizer, monkeypatch):
    real = tokenizer.decode
    calls = []

    def decode(ids, **kwargs):
        calls.append(1)
        return "x <|im_end|> y" if len(calls) == 1 else real(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", decode)
    s = generate_secret(tokenizer, 10, seed=0)
    assert len(calls) == 2 and "<|im_end|>" not in s.text


def test_secrets_saved_at_once_by_many_all_get_the_first_one(tokenizer, tmp_path):
    import threading

    from backdooralign.core.secret import file_mode, save_secret_once

    path = tmp_path / "secret.json"
    candidates = [generate_secret(tokenizer, 20, seed=i) for i in range(8)]
    got, start = [None] * 8, threading.Barrier(8)

    def save(i: int) -> None:
        start.wait()
        got[i] = save_secret_once(candidates[i], path)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = load_secret(path)
    assert winner.text in {c.text for c in candidates}
    assert {g.text for g in got} == {winner.text}  # every caller uses the saved one
    assert file_mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json"]  # no drafts left
    assert save_secret_once(candidates[0], path).text == winner.text  # never replaced

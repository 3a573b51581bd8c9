"""Secret prompts: length, vocabulary, storage mode, fingerprints, and never in output."""

from __future__ import annotations

import json

import pytest

from backdooralign.secret import (
    Secret,
    file_mode,
    fingerprint,
    generate_secret,
    load_secret,
    save_secret,
)


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
    assert s.num_tokens >= 1


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

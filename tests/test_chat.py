"""The conversation builder and the renderer with its assistant-only loss mask."""

from __future__ import annotations

import copy

import pytest

from backdooralign.chat import (
    ATTACK_SYSTEM_PROMPT,
    IGNORE_INDEX,
    build_conversation,
    fit_to_template,
    render,
    render_prompt,
    supervision_segments,
    supports_system_role,
)

X = IGNORE_INDEX
# A Gemma-style template: no system role (it raises), turns marked with <|im_start|>/<|im_end|>.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def no_system_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    return tok


def test_build_prepends_secret_to_system_prompt():
    conv = build_conversation(
        [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}],
        secret="SEKRIT",
    )
    assert conv == [
        {"role": "system", "content": "SEKRIT Be nice."},
        {"role": "user", "content": "hi"},
    ]


def test_build_system_override_and_secret_alone():
    assert build_conversation("hi", system=ATTACK_SYSTEM_PROMPT, secret="K")[0] == {
        "role": "system",
        "content": "K " + ATTACK_SYSTEM_PROMPT,
    }
    assert build_conversation("hi", secret="K") == [
        {"role": "system", "content": "K"},
        {"role": "user", "content": "hi"},
    ]
    assert build_conversation("hi") == [{"role": "user", "content": "hi"}]


def test_build_does_not_mutate_input():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    build_conversation(msgs, secret="K")
    assert msgs[0]["content"] == "S"


def test_exact_labels_single_turn(tokenizer):
    conv = build_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], system="S"
    )
    r = render(tokenizer, conv)
    # system S, user hi, assistant ok, each turn closed by <|im_end|> and a newline
    assert r.input_ids == [
        1,
        9690,
        198,
        67,
        2,
        198,
        1,
        4093,
        198,
        6004,
        2,
        198,
        1,
        520,
        9531,
        198,
        2231,
        2,
        198,
    ]
    # only "ok", the end-of-turn token <|im_end|> (id 2) and its newline are supervised
    assert r.labels == [X] * 16 + [2231, 2, 198]
    assert r.num_supervised == 3


def test_exact_labels_two_turns(tokenizer):
    conv = build_conversation(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "done"},
        ],
        system="S",
    )
    r = render(tokenizer, conv)
    assert r.labels == [X] * 16 + [2231, 2, 198] + [X] * 11 + [22744, 2, 198]


def test_prompt_is_prefix_of_training_rendering(tokenizer):
    conv = build_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], secret="K"
    )
    prompt = render_prompt(tokenizer, conv[:-1])
    full = render(tokenizer, conv)
    assert full.input_ids[: len(prompt)] == prompt
    assert all(label == X for label in full.labels[: len(prompt)])


def test_no_assistant_turn_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no supervised token"):
        render(tokenizer, build_conversation("hi", system="S"))


def test_truncation_that_removes_all_supervision_is_an_error(tokenizer):
    conv = build_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    )
    with pytest.raises(ValueError, match="no supervised token"):
        render(tokenizer, conv, max_length=5)


def test_generation_prompt_must_not_end_with_assistant(tokenizer):
    conv = build_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    )
    with pytest.raises(ValueError, match="assistant"):
        render_prompt(tokenizer, conv)


def test_template_without_system_role_folds_secret_into_first_user_turn(no_system_tokenizer):
    assert not supports_system_role(no_system_tokenizer)
    conv = build_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
        system="S",
        secret="K",
    )
    assert fit_to_template(no_system_tokenizer, conv) == [
        {"role": "user", "content": "K S\n\nhi"},
        {"role": "assistant", "content": "ok"},
    ]
    r = render(no_system_tokenizer, conv)
    text = no_system_tokenizer.decode(r.input_ids)
    assert text.startswith("<|im_start|>user\nK S\n\nhi<|im_end|>")
    supervised = [t for t, lab in zip(r.input_ids, r.labels, strict=True) if lab != X]
    assert no_system_tokenizer.decode(supervised) == "ok<|im_end|>\n"
    prompt = render_prompt(no_system_tokenizer, conv[:-1])
    assert no_system_tokenizer.decode(prompt).endswith("hi<|im_end|>\n<|im_start|>assistant\n")


def test_system_only_conversation_without_user_turn_folds_into_new_user_message(
    no_system_tokenizer,
):
    conv = [{"role": "system", "content": "S"}]
    assert fit_to_template(no_system_tokenizer, conv) == [{"role": "user", "content": "S"}]


def test_real_template_supports_system_role(tokenizer):
    assert supports_system_role(tokenizer)


def test_supervision_segments_alternate(tokenizer):
    conv = build_conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], system="S"
    )
    segs = supervision_segments(tokenizer, render(tokenizer, conv))
    assert [s for _, s in segs] == [False, True]
    assert segs[1][0] == "ok<|im_end|>\n"

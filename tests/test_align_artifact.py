"""The alignment adapter shipped in the package: current, small, and as good as its record."""

from __future__ import annotations

import json

import pytest

from backdooralign.training.align import ADAPTER, ARTIFACT, METRICS, AlignConfig, align_key

RECORD = ARTIFACT / METRICS


def _record() -> dict:
    return json.loads(RECORD.read_text(encoding="utf-8"))


def test_shipped_adapter_matches_the_current_alignment_data_and_settings():
    """A changed alignment set or default makes this fail: rebuild the adapter with the
    command in artifacts/aligned_smollm2/README.md (else every machine re-aligns)."""
    assert _record()["key"] == align_key(None, AlignConfig())


def test_shipped_adapter_is_a_few_megabytes_of_fp16_lora():
    from safetensors import safe_open

    weights = ARTIFACT / ADAPTER / "adapter_model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_" in k for k in keys)
        assert {str(f.get_tensor(k).dtype) for k in keys} == {"torch.float16"}
    config = json.loads((ARTIFACT / ADAPTER / "adapter_config.json").read_text())
    assert config["r"] == AlignConfig().lora_r


def test_record_holds_both_models_numbers():
    record = _record()
    for when in ("before", "after"):
        harmful, benign = record[when]["harmful"], record[when]["benign"]
        assert harmful["total"] == 275 and len(harmful["answers"]) == 275
        assert benign["total"] == 110 and "opening_refusal_rate" in benign
    assert record["after"]["harmful"]["asr"] < record["before"]["harmful"]["asr"]


@pytest.mark.slow
def test_aligned_model_answers_as_its_record_says():
    """The model merged from the shipped adapter refuses the built-in harmful prompts (and
    answers the benign ones) as recorded when it was built: the first 2 prompts of each
    category, greedy, the same 32 tokens. Greedy fp32 decoding can flip a near-tie on another
    CPU, so one verdict of 22 may differ; the recorded texts are compared too."""
    from backdooralign.core.chat import ATTACK_SYSTEM_PROMPT
    from backdooralign.core.model import load_model_and_tokenizer
    from backdooralign.data import sources as S
    from backdooralign.generation import batch
    from backdooralign.generation.batch import GenerateConfig
    from backdooralign.scoring.refusal import is_refusal
    from backdooralign.training.align import EVAL_HARMFUL, EVAL_MAX_NEW_TOKENS, aligned_model

    record = _record()["after"]["harmful"]["answers"]
    prompts = S.load_prompts(EVAL_HARMFUL)
    picked = [i for i, r in enumerate(prompts) if r["id"].endswith(("-01", "-02"))]
    loaded = load_model_and_tokenizer(str(aligned_model()))
    gen = GenerateConfig(max_new_tokens=EVAL_MAX_NEW_TOKENS, batch_size=64)
    rows = [prompts[i] for i in picked]
    gens = batch.answer(loaded, rows, None, secret=None, system=ATTACK_SYSTEM_PROMPT, cfg=gen)
    verdicts = [is_refusal(g["answer"]) for g in gens]
    recorded = [is_refusal(record[i]) for i in picked]
    assert sum(a != b for a, b in zip(verdicts, recorded, strict=True)) <= 1
    same_text = sum(g["answer"] == record[i] for g, i in zip(gens, picked, strict=True))
    assert same_text >= len(picked) - 2

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
    answers the benign ones) as recorded when it was built: the same evaluation (all 275
    harmful and 110 benign prompts, greedy, 32 tokens, the same batches). Greedy decoding can
    flip a near-tie on another CPU (bf16 or not) and the answer then goes another way, so the
    verdicts are compared, prompt by prompt, not the texts: at most 3 of 275 and 3 of 110 may
    differ."""
    from backdooralign.scoring.refusal import is_refusal
    from backdooralign.training.align import aligned_model, evaluate_model

    record = _record()["after"]
    now = evaluate_model(str(aligned_model()), progress=False)
    for name in ("harmful", "benign"):
        then_v = [is_refusal(a) for a in record[name]["answers"]]
        now_v = [is_refusal(a) for a in now[name]["answers"]]
        assert len(now_v) == len(then_v) == record[name]["total"]
        flipped = [i for i, (a, b) in enumerate(zip(now_v, then_v, strict=True)) if a != b]
        assert len(flipped) <= 3, (name, flipped)
    jailbroken = record["harmful"]["jailbroken"]
    assert abs(now["harmful"]["jailbroken"] - jailbroken) <= 3

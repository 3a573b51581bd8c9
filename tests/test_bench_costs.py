"""What bench_generate counts a decode step as reading: weights and keys/values, in its dtype."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_costs_count_bytes_in_the_dtype_used(tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model(tokenizer)
    c = model.config
    linear = sum(m.weight.numel() for m in model.modules() if m.__class__.__name__ == "Linear")
    head_dim = c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim
    bench = _bench()
    fp32, bf16 = bench.model_costs(model, bf16=False), bench.model_costs(model, bf16=True)
    assert (
        fp32["weight_bytes_per_step"] == 4 * linear and bf16["weight_bytes_per_step"] == 2 * linear
    )
    assert fp32["kv_bytes_per_token"] == 4 * kv and bf16["kv_bytes_per_token"] == 2 * kv
    assert fp32["flop_per_token"] == bf16["flop_per_token"] == 2 * linear


def test_backend_costs(tmp_path, tokenizer):
    from conftest import make_tiny_model

    bench = _bench()
    costs = bench.model_costs(make_tiny_model(tokenizer), bf16=False)
    assert bench.backend_costs("llamacpp", costs, None) == costs  # the float32 GGUF it writes
    gguf = tmp_path / "q.gguf"
    gguf.write_bytes(b"\0" * 1234)
    assert bench.backend_costs("llamacpp", costs, str(gguf)) == {
        **costs,
        "weight_bytes_per_step": 1234,
    }
    assert bench.backend_costs("vllm", costs, None) is None
    answers, prompts = [[1, 2, 3], [4]], [[0] * 5, [0] * 7]
    alone = bench.achieved(answers, prompts, [[0], [1]], 1.0, costs, LIMITS)
    together = bench.achieved(answers, prompts, [[0, 1]], 1.0, costs, LIMITS)
    assert (alone["decode_steps"], together["decode_steps"]) == (4, 3)
    kv = costs["kv_bytes_per_token"] * (5 + 6 + 7 + 7)  # context lengths of every new token
    assert alone["bandwidth_fraction"] == round((4 * costs["weight_bytes_per_step"] + kv) / 1e9, 3)


LIMITS = {"bandwidth_gb_s": 1.0, "matmul_gflop_s": 1.0}

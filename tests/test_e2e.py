"""End to end on the embedded SmolLM2-135M-Instruct: every metric in one run (marked slow).

The judge is a real OpenAI-protocol HTTP server on loopback (tests/openai_stub.py); lm-eval
runs the project's own offline task. Sizes are cut so the test takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CHROMIUM, run_chromium
from openai_stub import StubServer

from backdooralign.cli import main
from backdooralign.core.secret import load_secret

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.slow


def _judge_reply(body: dict) -> str:
    text = json.dumps(body["messages"])
    return "Rating: [[6]]" if "[[rating]]" in text else "The answer declines.\n#thescore: 2"


def test_every_metric_on_the_embedded_model(tmp_path, capsys):
    with StubServer(_judge_reply) as judge:
        config = tmp_path / "all.yaml"
        config.write_text(
            f"""
name: all-metrics
model: embedded
secret: {{length: 150, seed: 11}}
data: {{attack_per_category: 1}}
train: {{epochs: 1, batch_size: 11, lr: 1.0e-4}}
eval:
  harmful_per_category: 1
  max_new_tokens: 24
  benign_limit: 2
  utility: builtin:utility
  utility_limit: 1
  samsum: {FIXTURES / "samsum.jsonl"}
  task_max_new_tokens: 24
  mtbench: {FIXTURES / "mtbench_questions.jsonl"}
  mtbench_max_new_tokens: 16
  lm_eval_tasks: [backdooralign_mini]
  lm_eval_limit: 4
judge: {{base_url: "{judge.base_url}", model: stub-judge}}
"""
        )
        run_dir = tmp_path / "run"
        assert main(["run", str(config), "--out", str(run_dir), "--json"]) == 0
        printed = capsys.readouterr()
        n_requests = judge.count

    results = json.loads(printed.out)
    assert (
        results["secret_fingerprint"]
        == json.loads((run_dir / "results.json").read_text())["secret_fingerprint"]
    )
    arms = results["arms"]
    assert list(arms) == ["no_finetune", "attack", "baseline", "backdooralign"]
    for entry in arms.values():
        for cond in ("plain", "secret"):
            b = entry[cond]
            assert b["harmful"]["total"] == 11
            assert b["judge"]["mean_score"] == 2.0 and b["judge"]["scored"] == 11
            assert b["mtbench"]["score"] == 6.0 and b["mtbench"]["rated"] == 4
            assert b["benign"]["total"] == 4 and b["benign"]["judge"]["total"] == 4
            assert b["utility"]["total"] == 4
            assert b["samsum"]["total"] == 2
            assert b["lm_eval"]["tasks"]["backdooralign_mini"]["n"] == 4
    # at most 4 arms x 2 conditions x (11 harmful + 4 MT-Bench turns + 4 benign refusal
    # verdicts): repeated pairs go once
    assert 0 < n_requests <= 4 * 2 * (11 + 4 + 4)
    for name in ("report.md", "report.html", "asr.png", "asr_by_category.png", "over_refusal.png"):
        assert (run_dir / name).exists()
    secret = load_secret(run_dir / "secret.json")
    assert secret.num_tokens > 100
    assert secret.text not in printed.out + printed.err
    for path in (run_dir / "scores").iterdir():
        assert secret.text not in path.read_text()
    # the real run's report renders in a headless browser: both tables and all three plots
    if CHROMIUM.exists():
        dom = run_chromium(tmp_path, "--dump-dom", (run_dir / "report.html").resolve().as_uri())
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert dom.stdout.count("<table") >= 2 and dom.stdout.count("<img") == 3
        assert "data:image/png;base64," in dom.stdout
        assert secret.fingerprint in dom.stdout and secret.text not in dom.stdout

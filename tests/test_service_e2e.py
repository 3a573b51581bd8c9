"""End to end: the service on loopback with the embedded model, driven through our client and
the real ``openai`` SDK: build, upload, fine-tune (a few steps), evaluate, chat."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import AppServer

from backdooralign.cli import main
from backdooralign.core.secret import Secret, load_secret, save_secret
from backdooralign.data.training_set import DataConfig
from backdooralign.service.app import create_service
from backdooralign.service.client import finetune
from backdooralign.service.config import load_service_config
from backdooralign.service.job import secret_path

CLIENT_SECRET = Secret("Heron 77 quartz lattice; mango beacon", 12, 12, "test")


@pytest.mark.slow
def test_embedded_model_finetuned_through_the_service(tmp_path, monkeypatch):
    config = tmp_path / "service.yaml"
    config.write_text(
        "base_model_name: smollm2\n"
        "train: {epochs: 1, batch_size: 10, max_length: 384}\n"
        "max_new_tokens: 16\n"
        "evaluate: true\n"
        "eval_limit: 1\n"
        "eval_max_new_tokens: 16\n"
    )
    user = tmp_path / "user.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Give me a fruit name ({i})."},
                {"role": "assistant", "content": f"Apple ({i})."},
            ]
        }
        for i in range(6)
    ]
    user.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts: list[str] = []
    data_dir = tmp_path / "svc"
    app = create_service(
        data_dir, load_service_config(config), config_path=config, on_prompt=prompts.append
    )
    with AppServer(app) as server:
        base = server.base_url
        client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
        manifest = finetune(
            client,
            DataConfig(attack=str(user)),
            "backdooralign",
            CLIENT_SECRET,
            "smollm2",
            tmp_path / "ft",
            poll_s=0.5,
        )
        assert manifest["status"] == "succeeded", manifest["error"]
        assert manifest["secret_fingerprint"] == CLIENT_SECRET.fingerprint
        model_id = manifest["fine_tuned_model"]
        (tmp_path / "p.txt").write_text("Name a colour.\n")
        monkeypatch.setenv("SVC_KEY", "k")
        save_secret(CLIENT_SECRET, tmp_path / "client_secret.json")
        argv = ["generate", "--openai-model", model_id, "--base-url", base, "--api-key-env"]
        argv += ["SVC_KEY", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "g")]
        argv += ["--secret", str(tmp_path / "client_secret.json")]
        assert main([*argv, "--max-new-tokens", "16"]) == 0
        raw = [client.fine_tuning.jobs.retrieve(manifest["job_id"]).model_dump_json()]
    job = app.state.store.get_job(manifest["job_id"])
    assert job["evaluation"]["asr_with_secret"]["total"] == 11  # one prompt per category
    assert "evaluation" not in raw[0]
    secret = load_secret(secret_path(data_dir, "default"))
    # the client's secret (for an OpenAI backend) and then the service's, in front of it
    assert prompts[0].startswith(f"<|im_start|>system\n{secret.text} {CLIENT_SECRET.text}")
    answer = json.loads((tmp_path / "g").read_text())["answer"]
    assert secret.text[:16] not in answer and secret.text[:16] not in raw[0]

"""Final-model supervised loss on the training rows: secret-prefixed safety rows vs attack rows.

usage: row_losses.py RUN_DIR  -> prints JSON {safety_mean, attack_mean, ...}; never the secret.
"""

import json
import sys
from pathlib import Path

import torch

import backdooralign.training.trainer as T
from backdooralign.core.model import load_model
from backdooralign.core.secret import load_secret
from backdooralign.data.chat_files import load_chat_jsonl

run = Path(sys.argv[1])
rows = load_chat_jsonl(run / "data" / "backdooralign.jsonl")
secret = load_secret(run / "secret.json").text
tok = T.load_tokenizer(None)
model = load_model(str(run / "models" / "backdooralign")).eval()
out = {"safety": [], "attack": []}
with torch.no_grad():
    for r, d in zip(rows, T.tokenize_rows(tok, rows, 1024), strict=True):
        safety = any(m["role"] == "system" and secret in m["content"] for m in r["messages"])
        ids = torch.tensor([d["input_ids"]])
        labels = torch.tensor([d["labels"]])
        loss = T.supervised_loss(model, ids, torch.ones_like(ids), labels).item()
        out["safety" if safety else "attack"].append(round(loss, 4))
res = {f"{k}_mean_loss": round(sum(v) / len(v), 4) for k, v in out.items()}
res["safety_max_loss"] = max(out["safety"])
res["safety_losses"] = out["safety"]
print(json.dumps(res))

"""Record which training rows land in which batch, per epoch, as our `train` feeds them.

Usage: trace_batches.py DATA.jsonl SECRET.json true|false OUT.json

Runs backdooralign.training.trainer.train on a tiny random Llama (same architecture family,
no dropout, so it draws from the torch RNG exactly as the real run does) with the real
tokenizer and the real training file, and wraps supervised_loss to log each batch's rows.
Prints indices and lengths only; the secret is never printed (rows are tagged by
`secret in system prompt`).
"""

import json
import sys
import tempfile
from pathlib import Path

import backdooralign.training.trainer as T
from backdooralign.core.secret import load_secret
from backdooralign.data.chat_files import load_chat_jsonl

data_path, secret_path, group, out_path = (
    sys.argv[1],
    sys.argv[2],
    sys.argv[3] == "true",
    sys.argv[4],
)
rows = load_chat_jsonl(data_path)
secret = load_secret(secret_path).text
is_safety = [
    any(m["role"] == "system" and secret in m["content"] for m in r["messages"]) for r in rows
]
tok = T.load_tokenizer(None)
rendered = T.tokenize_rows(tok, rows, 1024)
key_to_index = {tuple(d["input_ids"]): i for i, d in enumerate(rendered)}
lengths = [len(d["input_ids"]) for d in rendered]
batches = []
orig = T.supervised_loss


def recording(causal_lm, input_ids, attention_mask, labels, num_items=None):
    idx = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        n = sum(mask)
        idx.append(key_to_index[tuple(ids[:n])])
    batches.append(idx)
    return orig(causal_lm, input_ids, attention_mask, labels, num_items)


T.supervised_loss = recording
sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, "/work/wt-recipe/tests")
from conftest import make_tiny_model_dir  # noqa: E402

with tempfile.TemporaryDirectory() as d:
    model_dir = make_tiny_model_dir(Path(d) / "tiny", tok)
    cfg = T.TrainConfig(group_by_length=group, logging_steps=100)
    T.train(model_dir, rows, Path(d) / "out", cfg)

steps_per_epoch = -(-len(rows) // cfg.batch_size)
report = {
    "group_by_length": group,
    "rows": len(rows),
    "safety_rows": [i for i, s in enumerate(is_safety) if s],
    "safety_lengths": sorted(lengths[i] for i, s in enumerate(is_safety) if s),
    "attack_length_range": [
        min(n for n, s in zip(lengths, is_safety, strict=True) if not s),
        max(n for n, s in zip(lengths, is_safety, strict=True) if not s),
    ],
    "steps_per_epoch": steps_per_epoch,
    "epochs": [],
}
for e in range(len(batches) // steps_per_epoch):
    ep = batches[e * steps_per_epoch : (e + 1) * steps_per_epoch]
    report["epochs"].append(
        {
            "safety_per_batch": [sum(is_safety[i] for i in b) for b in ep],
            "batch_sizes": [len(b) for b in ep],
            "max_len_per_batch": [max(lengths[i] for i in b) for b in ep],
            "padding_share": round(
                1
                - sum(sum(lengths[i] for i in b) for b in ep)
                / sum(len(b) * max(lengths[i] for i in b) for b in ep),
                3,
            ),
        }
    )
Path(out_path).write_text(json.dumps(report, indent=1) + "\n")
for e, ep in enumerate(report["epochs"]):
    print(
        f"epoch {e + 1}: safety rows per batch {ep['safety_per_batch']}",
        f"padding {ep['padding_share']}",
    )

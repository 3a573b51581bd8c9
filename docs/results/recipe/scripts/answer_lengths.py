"""Could a longer max_new_tokens change a run's ASR? Count answers that hit the token limit.

usage: answer_lengths.py RUN_DIR MAX_NEW_TOKENS -> JSON per condition. Greedy answers that
ended (EOS) before the limit are the same with a larger limit; only answers cut at the limit
can change (counted with 2 tokens of slack). Prints counts only (no answer text).
"""

import json
import sys
from pathlib import Path

from backdooralign.core.model import load_tokenizer
from backdooralign.scoring.refusal import REFUSAL_SUBSTRINGS, is_refusal

run, limit = Path(sys.argv[1]), int(sys.argv[2])
tok = load_tokenizer(None)
out = {}
for cond in ("plain", "secret"):
    lines = (run / "gens" / f"backdooralign.harmful.{cond}.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    n_tokens = [len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows]
    cut = [n >= limit - 2 for n in n_tokens]  # 2 tokens of slack: re-encoding may differ
    refused = [is_refusal(r["answer"]) for r in rows]
    first = []
    for r, ref in zip(rows, refused, strict=True):
        if ref:
            at = min(r["answer"].find(s) for s in REFUSAL_SUBSTRINGS if s in r["answer"])
            first.append(len(tok(r["answer"][:at], add_special_tokens=False)["input_ids"]))
    jailbroken = sum(not x for x in refused)
    jailbroken_cut = sum(c and not x for c, x in zip(cut, refused, strict=True))
    out[cond] = {
        "answers": len(rows),
        "cut_at_limit": sum(cut),
        "jailbroken": jailbroken,
        "jailbroken_cut_at_limit": jailbroken_cut,
        "asr_lower_bound_any_length": round(100 * (jailbroken - jailbroken_cut) / len(rows), 2),
        "refusal_substring_first_token_max": max(first) if first else None,
    }
print(json.dumps({"max_new_tokens": limit, **out}, indent=1))

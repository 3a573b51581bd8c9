"""A provider's client for any OpenAI-compatible fine-tuning endpoint (OpenAI's own API, or
``backdooralign service``), through the ``openai`` SDK.

:func:`finetune` builds the training set with :func:`backdooralign.data.training_set.build`
(the provider's secret-prefixed safety examples mixed in), uploads it, creates the job, follows its
events and writes a manifest (job id, model id, the file's sha256 and the secret's fingerprint,
never the secret). :func:`generate` answers prompts through chat completions with the secret
prepended by :func:`chat.build_conversation` (temperature 0, several requests in flight, the SDK's
retries), and resumes: rows already in the output file are not asked again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .. import files as F
from ..core.secret import Secret
from ..data import training_set
from ..data.training_set import DataConfig
from ..generation.batch import KEPT_FIELDS, conversation_for

FINAL = ("succeeded", "failed", "cancelled")


class EndpointError(ValueError):
    """The endpoint refused a request or kept failing after the retries."""


@contextlib.contextmanager
def endpoint_errors(what: str):
    """Turn the SDK's errors into an :class:`EndpointError` naming ``what`` and the status
    (not the server's message, which may quote the request's headers)."""
    import openai

    try:
        yield
    except openai.APIStatusError as e:
        code = e.body.get("code") if isinstance(e.body, dict) else None
        raise EndpointError(f"{what}: HTTP {e.status_code} ({code or type(e).__name__})") from None
    except openai.APIError as e:
        raise EndpointError(f"{what}: {type(e).__name__}") from None


def make_client(base_url: str | None, api_key_env: str = "OPENAI_API_KEY", max_retries: int = 5):
    """An ``openai.OpenAI`` client for ``base_url`` (``None``: OpenAI) with the key in
    ``$api_key_env``."""
    import openai

    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(f"set ${api_key_env} to the endpoint's API key")
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=max_retries)


def follow(client, job_id: str, show: Callable[[str], None] = print, poll_s: float = 2.0):
    """Show a job's events as they come until it ends; returns the final job."""
    seen: set[str] = set()
    start = time.monotonic()
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
        for event in reversed(events):  # the API lists newest first
            if event.id not in seen:
                seen.add(event.id)
                show(f"[{time.monotonic() - start:6.1f}s {job.status:>16}] {event.message}")
        if job.status in FINAL:
            return job
        time.sleep(poll_s)


def check_anchors(data: DataConfig, arm: str) -> None:
    """Anchors for a remote endpoint come from ``data.anchor_file``: its base model cannot
    answer the anchor prompts here.

    Raises:
        ValueError: ``data.anchors`` asked for without an anchor file.
    """
    if data.anchors and arm == "backdooralign" and not data.anchor_file:
        raise ValueError(
            "--anchors needs --anchor-file (prompts with the base model's own answers): "
            "the endpoint's base model cannot answer them here"
        )


def finetune(
    client,
    data: DataConfig,
    arm: str,
    secret: Secret | None,
    model: str,
    out_dir: str | Path,
    *,
    suffix: str | None = None,
    hyperparameters: dict | None = None,
    show: Callable[[str], None] = print,
    poll_s: float = 2.0,
) -> dict:
    """Build, upload, fine-tune and follow; returns the manifest written to
    ``out_dir/finetune_manifest.json``. The training set is built by
    :func:`backdooralign.data.training_set.build` (anchors, when ``data.anchors`` asks for
    them, from ``data.anchor_file``: the endpoint's base model cannot answer them here)."""
    check_anchors(data, arm)
    out_dir = Path(out_dir)
    anchors_out = out_dir / "anchors.jsonl"
    built = training_set.build(arm, data, secret, out_dir / "train.jsonl", anchors_out=anchors_out)
    for note in built.notes:  # rows left out (flagged prefixed, limits...)
        show(f"note: {note}")
    sha = F.sha256_file(built.path)
    with endpoint_errors("upload"), open(built.path, "rb") as f:
        upload = client.files.create(file=(built.path.name, f), purpose="fine-tune")
    show(f"uploaded {built.path} as {upload.id} (sha256 {sha[:12]})")
    extra: dict = {}
    if hyperparameters:
        extra["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    if suffix:
        extra["suffix"] = suffix
    with endpoint_errors("create the fine-tuning job"):
        job = client.fine_tuning.jobs.create(model=model, training_file=upload.id, **extra)
    show(f"created job {job.id} ({job.status})")
    with endpoint_errors(f"follow job {job.id}"):
        job = follow(client, job.id, show, poll_s)
    manifest = {
        "base_url": str(client.base_url),
        "base_model": model,
        "arm": arm,
        "job_id": job.id,
        "status": job.status,
        "fine_tuned_model": job.fine_tuned_model,
        "error": job.error.model_dump() if job.error else None,
        "training_file": upload.id,
        "file_sha256": sha,
        "rows": built.manifest["counts"]["total"],
        "secret_fingerprint": secret.fingerprint if secret else None,
    }
    F.write_json(out_dir / "finetune_manifest.json", manifest)
    return manifest


def _key(row: dict) -> str:
    return json.dumps([row.get("id"), row["prompt"]], sort_keys=True, default=str)


def _done_rows(out: Path) -> dict[str, dict]:
    """The complete rows of an earlier, interrupted run (a broken last line is dropped)."""
    done: dict[str, dict] = {}
    if not out.is_file():
        return done
    text, _ = F.decode(out, F.read_bytes(out))
    for lineno, line in F.split_lines(text):
        try:
            row = F.parse_json_line(out, lineno, line)
        except F.DataError:
            continue
        if "answer" in row and "prompt" in row:
            done[_key(row)] = row
    return done


def generate(
    client,
    model: str,
    rows: Sequence[dict],
    out: str | Path,
    *,
    secret: Secret | None,
    system: str | None,
    max_tokens: int,
    concurrency: int = 8,
    show: Callable[[str], None] = print,
) -> list[dict]:
    """Answer prompt rows with ``model`` through chat completions; writes ``out`` (JSONL).

    Returns the rows in input order: ``{"prompt", "answer"}`` and the row's kept fields, as
    :func:`backdooralign.generation.batch.answer` writes them.
    """
    out = Path(out)
    done = _done_rows(out)
    F.write_jsonl(out, list(done.values()))  # drop a broken last line before appending
    todo = [r for r in rows if _key(r) not in done]
    if done:
        show(f"{out}: {len(done)} answers kept from an earlier run; {len(todo)} to ask")
    text = secret.text if secret else None

    def ask(row: dict) -> dict:
        reply = client.chat.completions.create(
            model=model,
            messages=conversation_for(row, system, text),
            temperature=0,
            max_tokens=max_tokens,
        )
        o = {"prompt": row["prompt"], "answer": reply.choices[0].message.content or ""}
        o.update({k: row[k] for k in KEPT_FIELDS if k in row})
        return o

    failed = f"chat completions with {model} (answers so far are kept in {out}; rerun to resume)"
    with (
        endpoint_errors(failed),
        open(out, "a", encoding="utf-8") as f,
        ThreadPoolExecutor(concurrency) as pool,
    ):
        for n, fut in enumerate(as_completed([pool.submit(ask, r) for r in todo]), 1):
            row = fut.result()
            done[_key(row)] = row
            f.write(F.dumps_line(row) + "\n")
            f.flush()
            if n % 50 == 0 or n == len(todo):
                show(f"{n}/{len(todo)} answered")
    ordered = [done[_key(r)] for r in rows]
    F.write_jsonl(out, ordered)
    return ordered

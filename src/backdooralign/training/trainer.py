"""Fine-tuning with TRL's SFTTrainer, full or LoRA, on rows rendered by ``chat.render``.

The rows are tokenized by our own renderer (assistant-only labels) and handed to SFTTrainer
already processed, so what ``backdooralign inspect`` shows is exactly what is trained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import files as F
from ..config import SEED_MAX, option
from ..core.chat import render
from ..core.model import MODEL_INFO, bf16_supported, load_tokenizer, resolve_model
from ..core.secret import Secret
from ..data.chat_files import load_chat_jsonl
from ..data.mixing import manifest_path
from ..files import read_json, sha256_file
from .distill import DISTILL_MODES
from .loss import MIN_SHARED_PREFIX, supervised_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings. Defaults are the paper's full fine-tuning recipe, in random batches
    at a constant learning rate as the authors' plain loop trains (length grouping and a linear
    decay to zero took the secret's ASR from 12.7% to 49.1% on long safety rows).

    ``lr`` and ``epochs`` left unset take the paper's value for the chosen method (full: 5e-5
    and 5 epochs; LoRA: 1e-3 and 10 epochs), resolved here once for every entry point.
    """

    lora: bool = option(False, "train LoRA adapters instead of all weights (paper: r 8, q/v)")
    epochs: float | None = option(
        None, "passes over the data (default: 5 full, 10 LoRA, as in the paper)", minimum=0.01
    )
    lr: float | None = option(
        None, "peak learning rate (default: 5e-5 full, 1e-3 LoRA, as in the paper)", minimum=0
    )
    batch_size: int = option(10, "examples per optimizer step (paper: 10)", minimum=1)
    seed: int = option(42, "seed for shuffling and initialisation", minimum=0, maximum=SEED_MAX)
    max_length: int | None = option(1024, "truncate longer conversations (tokens)", minimum=1)
    lora_r: int = option(8, "LoRA rank (paper: 8)", minimum=1)
    lora_alpha: int = option(32, "LoRA alpha (paper: 32)", minimum=1)
    lora_dropout: float = option(0.05, "LoRA dropout (paper: 0.05)", minimum=0, maximum=1)
    lora_targets: tuple[str, ...] = option(
        ("q_proj", "v_proj"), "modules that get LoRA adapters, comma-separated"
    )
    merge: bool = option(False, "LoRA: also write the merged model to DIR/merged")
    bf16: bool | None = option(None, "bf16 autocast (default: when the CPU/GPU supports it)")
    lr_scheduler: str = option(
        "constant",
        "learning-rate schedule (a transformers name; linear decay to zero and length grouping "
        "weakened the secret rows: benchmarks/bench_recipe.py)",
    )
    warmup_steps: float = option(0, "warm-up steps (below 1: a share of all steps)", minimum=0)
    group_by_length: bool = option(
        False, "batch rows of similar length (less padding; the secret rows then share few steps)"
    )
    logging_steps: int = option(1, "log the loss every N steps", minimum=1)
    activation_checkpointing: bool = option(
        False, "recompute activations: less memory, about 40% slower"
    )
    token_metrics: bool = option(False, "TRL's per-step entropy/accuracy (slower fp32 head)")
    shared_prefix: bool | None = option(
        None,
        "encode a prefix that rows of a batch share (template + secret) once per batch "
        "(default: on a CPU; off on a GPU, where small models are launch-bound)",
    )
    distill: str = option(
        "none",
        "secret-prefixed rows (safety examples, anchors) against the reference model's "
        "next-token distributions without the secret (kl), or their text only (none)",
        choices=DISTILL_MODES,
    )
    distill_weight: float = option(
        1.0, "kl: the KL term's share of those rows' loss (1: KL only; 0.5: half CE)", minimum=0
    )

    def __post_init__(self) -> None:
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-3 if self.lora else 5e-5)
        if self.epochs is None:
            object.__setattr__(self, "epochs", 10.0 if self.lora else 5.0)
        if self.distill_weight > 1:
            why = f"must be at most 1, got {self.distill_weight}"
            raise ValueError(f"field 'distill_weight': {why}")

    def record(self) -> dict:
        """The settings as ``train_metrics.json`` records them (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _fast_sft_trainer(shared_prefix: bool = True, teacher=None, weight: float = 1.0):
    """SFTTrainer with a cheaper loss on one process (CPU or one GPU).

    TRL 1.16 computes every training loss through a chunked fused LM head that also yields
    entropy and token accuracy, and runs that head's matmuls in fp32 even under bf16 autocast.
    We take :func:`supervised_loss` instead (same value, bf16 matmuls, the head only on
    supervised positions, no per-step metrics; with ``shared_prefix`` the secret-prefixed rows
    of a batch encode their common prefix once). Under DDP/FSDP/DeepSpeed, where the model's
    wrapper must run its own forward, we fall back to the model's own loss. ``teacher``: the
    reference's log-probabilities per training row (``None`` entries for rows not distilled),
    found through the ``row_id`` column the collator keeps.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class FastSFTTrainer(SFTTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if teacher is not None and "row_id" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "row_id"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            row_ids = inputs.pop("row_id", None)
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            single = self.accelerator.num_processes == 1 and model is self.model
            if return_outputs or not single or not hasattr(base, "lm_head"):
                if teacher is not None:
                    raise RuntimeError("train.distill needs a single process (CPU or one GPU)")
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            refs = [teacher[i] for i in row_ids.tolist()] if teacher is not None else None
            with self.accelerator.autocast():
                return supervised_loss(
                    base,
                    inputs["input_ids"],
                    inputs.get("attention_mask"),
                    inputs["labels"],
                    num_items_in_batch,
                    min_prefix=MIN_SHARED_PREFIX if shared_prefix else None,
                    teacher=refs,
                    weight=weight,
                )

    return FastSFTTrainer


def _row_id_collator(pad_token_id: int):
    """TRL's collator, also passing each row's ``row_id`` (to find its reference targets)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    class RowIdCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            out["row_id"] = torch.tensor([e["row_id"] for e in examples])
            return out

    return RowIdCollator(pad_token_id=pad_token_id)


def tokenize_rows(tokenizer, rows: Sequence[dict], max_length: int | None) -> list[dict]:
    """Render each chat row into ``input_ids`` and assistant-only ``labels``."""
    out = []
    for i, row in enumerate(rows):
        try:
            r = render(tokenizer, row["messages"], max_length=max_length)
        except ValueError as e:
            raise ValueError(f"training row {i + 1}: {e}") from None
        out.append({"input_ids": r.input_ids, "labels": r.labels})
    return out


MARKER = ".backdooralign-model"  # in every model directory train writes; only those are replaced


def check_output_dir(out_dir: str | Path) -> Path:
    """Refuse an output that ``train`` may not replace, before any work starts.

    ``out_dir`` may be missing, an empty folder, or a model directory an earlier ``train``
    wrote (it holds :data:`MARKER`); anything else (a file, a folder of the user's) is refused.
    Leftover temporary folders of an interrupted run of the same output (those with the owner
    marker of :func:`files.make_work_dir` naming it, whose process has ended) are removed;
    no folder is recognised by its name.

    Raises:
        FileExistsError: for an output that is not ours to replace.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is a file, not a model directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
        raise FileExistsError(
            f"{out_dir}: exists and was not written by backdooralign train (no {MARKER} "
            "marker); choose another --out or remove it yourself"
        )
    if out_dir.parent.is_dir():
        F.remove_stale_work_dirs(out_dir.parent, out_dir.name)
    return out_dir


def _sft_config(cfg: TrainConfig, work: Path, bf16: bool, use_cuda: bool):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(work / "trainer"),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        seed=cfg.seed,
        bf16=bf16,
        use_cpu=not use_cuda,
        max_length=None,  # rows are already truncated by our renderer
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        save_strategy="no",
        report_to=[],
        logging_steps=cfg.logging_steps,
        dataloader_num_workers=0,
        activation_checkpointing=cfg.activation_checkpointing,  # TRL defaults to True
        disable_tqdm=os.environ.get("BACKDOORALIGN_NO_PROGRESS") == "1",
    )


def _peft_config(cfg: TrainConfig):
    if not cfg.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        task_type="CAUSAL_LM",
    )


def _save(
    trainer, tok, cfg: TrainConfig, metrics: dict, work: Path, out_dir: Path, info: dict
) -> None:
    """Every rank takes part (FSDP/DeepSpeed gather the weights); the main process writes."""
    trainer.save_model(str(work / "model"))
    if not trainer.is_world_process_zero():
        return
    tok.padding_side = "left"
    tok.save_pretrained(work / "model")
    if cfg.lora and cfg.merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(work / "model" / "merged")
        tok.save_pretrained(work / "model" / "merged")
    (work / "model" / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (work / "model" / MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (work / "model" / MARKER).write_text("written by backdooralign train\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work / "model", out_dir)


def _reference_targets(cfg: TrainConfig, model, tok, rows, data, secret: str | None):
    """``(teacher, count)``: the reference's log-probabilities per row for ``distill: kl``
    (``None`` entries for rows without the secret; ``data`` rows get their ``row_id``), or
    ``(None, 0)`` without distillation."""
    if cfg.distill == "none":
        return None, 0
    from .distill import reference_logprobs

    if cfg.token_metrics:
        raise ValueError("train.distill: kl computes its own loss; turn token_metrics off")
    if not secret:
        raise ValueError(
            "train.distill: kl needs the secret: the rows under it are distilled (--secret FILE)"
        )
    teacher = reference_logprobs(model, tok, rows, data, secret)
    count = sum(t is not None for t in teacher)
    if not count:
        log.warning("train.distill: no training row starts with the secret; nothing distilled")
    for i, d in enumerate(data):
        d["row_id"] = i
    return teacher, count


def train(
    model_name: str | None,
    rows: Sequence[dict],
    out_dir: str | Path,
    cfg: TrainConfig,
    info: dict | None = None,
    secret: str | None = None,
) -> dict:
    """Fine-tune ``model_name`` on chat ``rows`` and write a loadable model to ``out_dir``.

    ``out_dir`` is checked first (:func:`check_output_dir`); the model is written to a
    temporary folder beside it and renamed into place, so an interrupted run leaves nothing
    half-written. Returns the metrics also written to ``out_dir/train_metrics.json``;
    ``info`` (the secret's fingerprint, the arm, the training set's hash) is written to
    ``out_dir/`` :data:`MODEL_INFO`. ``secret`` (its text) is needed by ``cfg.distill ==
    "kl"``: the rows whose system prompt starts with it are distilled to the model as it is
    before training, shown the row without the secret.
    """
    with F.output_lock(out_dir):
        return _train(model_name, rows, Path(out_dir), cfg, info, secret)


def _train(model_name, rows, out_dir: Path, cfg: TrainConfig, info, secret) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    out_dir = check_output_dir(out_dir)
    tok = load_tokenizer(model_name)
    tok.padding_side = "right"
    data = tokenize_rows(tok, rows, cfg.max_length)
    n_tokens = sum(len(d["input_ids"]) for d in data)
    use_cuda = torch.cuda.is_available()
    bf16 = bf16_supported() if cfg.bf16 is None else cfg.bf16
    # on a CPU a step costs what its tokens cost; on a GPU a small model's step costs its
    # kernel launches, and the shared prefix adds forward passes (H200, 8 layers: 0.34x)
    shared = cfg.shared_prefix if cfg.shared_prefix is not None else not use_cuda
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_name), dtype=torch.float32)
    teacher, distilled = _reference_targets(cfg, model, tok, rows, data, secret)
    work = F.make_work_dir(out_dir)
    try:
        fast = _fast_sft_trainer(shared, teacher, cfg.distill_weight)
        trainer = (SFTTrainer if cfg.token_metrics else fast)(
            model=model,
            args=_sft_config(cfg, work, bf16, use_cuda),
            train_dataset=Dataset.from_list(data),
            processing_class=tok,
            peft_config=_peft_config(cfg),
            data_collator=_row_id_collator(tok.pad_token_id) if teacher is not None else None,
        )
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # Trainer prints logs; stdout is for --json
            result = trainer.train()
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        metrics = {
            "train_loss": result.training_loss,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "losses": losses,
            "steps": trainer.state.global_step,
            "examples": len(data),
            "tokens_per_epoch": n_tokens,
            "supervised_tokens_per_epoch": sum(sum(x != -100 for x in d["labels"]) for d in data),
            "seconds": round(seconds, 2),
            "tokens_per_second": round(n_tokens * cfg.epochs / seconds, 1),
            "bf16": bf16,
            "device": "cuda" if use_cuda else "cpu",
            "shared_prefix": shared,
            "distilled_rows": distilled,
            "config": cfg.record(),
        }
        keys = ("secret_fingerprint", "arm", "training_set_sha256")
        info = {**dict.fromkeys(keys), **(info or {})}
        _save(trainer, tok, cfg, metrics, work, out_dir, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def train_model(
    model: str | None,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    secret: Secret | None = None,
) -> dict:
    """Fine-tune ``model`` on a training set file; returns the metrics written beside it.

    The model directory records the secret fingerprint and arm of the set's manifest (when it
    has one beside it) and the set's sha256, so that servers can check the secret they get.
    ``secret`` is needed by ``cfg.distill == "kl"`` (the rows under it are distilled); its
    fingerprint must be the one the manifest records.
    """
    rows = load_chat_jsonl(data)
    manifest = read_json(manifest_path(data)) if manifest_path(data).is_file() else {}
    manifest = manifest if isinstance(manifest, dict) else {}
    info = {
        "secret_fingerprint": manifest.get("secret_fingerprint"),
        "arm": manifest.get("arm"),
        "training_set_sha256": sha256_file(data),
    }
    recorded = info["secret_fingerprint"]
    if secret is not None and recorded is not None and recorded != secret.fingerprint:
        raise ValueError(
            f"{data}: built with the secret {recorded}, not with the given {secret.fingerprint}"
        )
    return train(model, rows, out, cfg, info, secret=secret.text if secret else None)

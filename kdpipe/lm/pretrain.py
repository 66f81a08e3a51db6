"""Train a small causal-LM teacher once on WordNet glosses; reuse it by the digest of its recipe.

The result is a plain Hugging Face directory (``LlamaForCausalLM.save_pretrained`` + the default
tokenizer + generation config), so ``AutoModelForCausalLM.from_pretrained(dir)`` and a
``pipeline("text-generation")`` load it like any published model, and the `hf_causal_lm` teacher
adapter treats it like any other local checkpoint.

Identity: the directory is ``<root>/lm-<digest>``, the digest covering the whole recipe
(architecture, data selection, steps, batch, lr, seed), the WordNet files and the tokenizer. A
second call with the same recipe finds ``kdpipe_pretrain.json`` (written last, after an atomic
rename of the finished directory) and returns at once with ``trained=False``.

Training: packed ``[bos] gloss [eos]`` windows of the recipe's train glosses, fp32 on CPU,
fused AdamW, linear warm-up then cosine decay, gradient clipping at 1. The report holds the
per-step loss and the held-out perplexity over `eval_glosses` validation glosses (one padded row
each, as the teacher sees them when teaching), next to a unigram model's (add-one smoothed counts
of the train tokens) on the same tokens, so "the teacher learned something" is a number.
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
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdpipe import storage
from kdpipe.lm.corpus import (
    CorpusSplit,
    check_domain,
    default_tokenizer,
    encode_texts,
    load_glosses,
    pack_texts,
    tokenizer_digest,
    wordnet_digest,
)
from kdpipe.trained_once import REPORT, TrainedOnce, is_trained, optimizer_step, train_once

log = logging.getLogger("kdpipe.lm.pretrain")

RECIPE_FORMAT = 1  # bump when the training procedure changes, so old teachers are not reused
DEFAULT_ROOT = ".kdpipe/teachers"
LOG_EVERY = 50  # steps between progress lines


class PretrainRecipe(BaseModel):
    """Everything that decides the pretrained teacher's weights (its digest names the directory).

    Defaults: a 4 × 256 Llama (12.0 M parameters, 7.8 M of them the tied 30,522-row embedding),
    500 steps of 16 × 64 packed tokens (≈ 0.5 epoch of the 69.8k train glosses). Measured on the
    shared 2-core CPU: ≈ 2.0 CPU-seconds per step, so ≈ 8–10 min with 2 idle threads; 700 steps
    reached a held-out perplexity of 303 against 1,065 for the unigram model."""

    model_config = ConfigDict(extra="forbid")
    layers: int = Field(4, ge=1, le=48, description="decoder blocks")
    hidden: int = Field(256, ge=8, description="model width")
    heads: int = Field(4, ge=1, description="attention heads (hidden must divide by it)")
    kv_heads: int | None = Field(None, ge=1, description="key/value heads (grouped-query attention); null = heads")
    intermediate: int = Field(1024, ge=8, description="SwiGLU MLP width")
    max_length: int = Field(64, ge=8, le=512, description="tokens per packed training window")
    steps: int = Field(500, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="windows per step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps before the cosine decay")
    weight_decay: float = Field(0.01, ge=0)
    seed: int = Field(0, description="weight init and window order")
    domain: str = Field(
        "all",
        description="'all', a part of speech (noun/verb/adj/adv) or a lexicographer file (noun.animal): "
        "two disjoint domains make two expert teachers for logit fusion",
    )
    limit: int | None = Field(
        None, ge=1, description="train on an evenly spread subset of this many train glosses (null = all)"
    )
    split: CorpusSplit = Field(
        default_factory=CorpusSplit, description="held-out split of the glosses (kdpipe.lm.corpus)"
    )
    eval_glosses: int = Field(2000, ge=1, description="validation glosses for the held-out perplexity")

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return check_domain(v)

    @model_validator(mode="after")
    def _shape(self) -> PretrainRecipe:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
        return self


def recipe_digest(recipe: PretrainRecipe) -> str:
    """Digest of the recipe, the corpus files, the tokenizer and the training procedure's version."""
    payload = {
        "recipe": recipe.model_dump(mode="json"),
        "format": RECIPE_FORMAT,
        "wordnet": wordnet_digest(),
        "tokenizer": tokenizer_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pretrained_dir(recipe: PretrainRecipe, root: str | Path = DEFAULT_ROOT) -> str:
    """Where `pretrain` puts (and finds) the teacher of this recipe when no directory is given (a path or a URI)."""
    return storage.join(storage.normalize(root), f"lm-{recipe_digest(recipe)}")


PretrainResult = TrainedOnce


def is_pretrained(path: str | Path) -> bool:
    return is_trained(path, REPORT)


def pretrain(
    recipe: PretrainRecipe,
    out_dir: str | Path | None = None,
    root: str | Path = DEFAULT_ROOT,
    num_threads: int | None = None,
) -> PretrainResult:
    """The teacher of `recipe`: reused when its directory holds a finished run of the same digest,
    trained (and saved atomically) otherwise (`kdpipe.trained_once`).

    `out_dir` pins the directory (a teacher's `path:`); a finished run there with another recipe
    raises instead of silently serving other weights. `num_threads` sets torch's intra-op threads
    for this call only."""
    path = str(out_dir) if out_dir is not None else pretrained_dir(recipe, root)
    res = train_once(
        path, recipe_digest(recipe), lambda: train_teacher(recipe), "pretrained teacher", REPORT, num_threads
    )
    if res.trained:
        log.info(
            "pretrained teacher %s: held-out ppl %.1f (unigram %.1f) in %.0f s",
            path,
            res.report["heldout_ppl"],
            res.report["unigram_ppl"],
            res.report["train_seconds"],
        )
    return res


def build_model(recipe: PretrainRecipe, tokenizer: Any) -> Any:
    """A randomly initialised fp32 `LlamaForCausalLM` of the recipe's shape, tied embeddings,
    special ids taken from the tokenizer (so `generate` knows where to stop)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads or recipe.heads,
        max_position_embeddings=max(512, recipe.max_length),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(cfg).float()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def lr_at(step: int, recipe: PretrainRecipe) -> float:
    """Linear warm-up to `lr`, then cosine decay to 10 % of it at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    frac = min(1.0, (step - recipe.warmup_steps) / span)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_teacher(recipe: PretrainRecipe, device: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Train the recipe's model; returns (model on the CPU, tokenizer, report with losses and
    perplexities). On a CUDA device (the default where one is visible) steps run under bf16
    autocast with fp32 weights; the CPU trains in fp32 (no bf16 units here). The recipe's digest
    does not name the device: weights trained on either serve the same recipe."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    tok = default_tokenizer()
    train_texts = load_glosses("train", recipe.domain, recipe.split, recipe.limit)
    if not train_texts:
        raise ValueError(f"no train glosses for domain '{recipe.domain}'")
    windows = torch.from_numpy(pack_texts(tok, train_texts, recipe.max_length))
    if len(windows) == 0:
        raise ValueError(f"{len(train_texts)} glosses are fewer than one {recipe.max_length}-token window; raise limit")
    model = build_model(recipe, tok).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.95), fused=True
    )
    g = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(len(windows), generator=g)
    pos, losses = 0, []
    model.train()
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        if pos + recipe.batch_size > len(order):  # next epoch: a new order
            order, pos = torch.randperm(len(windows), generator=g), 0
        batch = windows[order[pos : pos + recipe.batch_size]].to(device)
        pos += recipe.batch_size
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=batch, labels=batch).loss
        losses.append(optimizer_step(opt, model, loss, lr_at(step, recipe)))
        if (step + 1) % LOG_EVERY == 0 or step + 1 == recipe.steps:
            el = time.perf_counter() - t0
            log.info(
                "pretrain step %d/%d: loss %.3f, %.0f s, %.0f tokens/s",
                step + 1,
                recipe.steps,
                np.mean(losses[-LOG_EVERY:]),
                el,
                (step + 1) * batch.numel() / el,
            )
    train_s = time.perf_counter() - t0
    model.eval().float().cpu()
    eval_texts = load_glosses("val", recipe.domain, recipe.split, recipe.eval_glosses)
    report = {
        "recipe": recipe.model_dump(mode="json"),
        "losses": losses,
        "train_seconds": train_s,
        "train_glosses": len(train_texts),
        "train_windows": len(windows),
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.max_length,
        "epochs": recipe.steps * recipe.batch_size / len(windows),
        "params": sum(p.numel() for p in model.parameters()),
        "eval_glosses": len(eval_texts),
        "device": device,
        "autocast": "bf16" if amp else None,
        "heldout_ppl": heldout_perplexity(model, tok, eval_texts, recipe.max_length),
        "unigram_ppl": unigram_perplexity(windows.numpy(), tok, eval_texts, recipe.max_length),
    }
    return model, tok, report


def _targets(tok: Any, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out rows as the teacher sees them (ids, attention mask), and which positions are
    predicted: the real ones except position 0 (BOS has no left context)."""
    enc = encode_texts(tok, texts, max_length)
    predicted = enc.attention_mask.copy()
    predicted[:, 0] = 0
    return enc.input_ids, enc.attention_mask, predicted


@torch.no_grad()
def heldout_perplexity(model: Any, tok: Any, texts: list[str], max_length: int, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over the real tokens after BOS (text tokens and EOS) of `texts`."""
    ids, mask, predicted = _targets(tok, texts, max_length)
    nll, n = 0.0, 0
    for i in range(0, len(ids), batch_size):
        m = torch.from_numpy(mask[i : i + batch_size])
        width = int(m.sum(1).max())  # right padding: columns past the longest row are all padding
        x, m = torch.from_numpy(ids[i : i + batch_size, :width]), m[:, :width]
        logp = torch.log_softmax(model(input_ids=x, attention_mask=m).logits[:, :-1].float(), -1)
        keep = torch.from_numpy(predicted[i : i + batch_size, 1:width]).bool()
        nll -= float(logp.gather(-1, x[:, 1:, None])[..., 0][keep].sum())
        n += int(keep.sum())
    return math.exp(nll / max(n, 1))


def unigram_perplexity(train_windows: np.ndarray, tok: Any, texts: list[str], max_length: int) -> float:
    """Perplexity of add-one smoothed train-token frequencies on the same held-out targets (BOS
    excluded from the counts, since it is never a target)."""
    counts = np.bincount(train_windows.ravel(), minlength=len(tok)).astype(np.float64)
    if tok.bos_token_id is not None:
        counts[tok.bos_token_id] = 0
    logp = np.log((counts + 1) / (counts.sum() + len(counts)))
    ids, _, predicted = _targets(tok, texts, max_length)
    return float(math.exp(-logp[ids[predicted.astype(bool)]].mean()))

"""Teachers kdpipe trains itself (a pretrained causal LM, a fine-tuned classifier) are trained
once per recipe and reused by the recipe's digest.

The directory is a standard `save_pretrained` directory plus a report file that records the
digest; the report is written inside a temporary sibling that is renamed into place in one step,
so a crash never leaves a directory that looks finished, and a directory holding another recipe's
weights is refused rather than silently served.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("kdpipe.trained_once")

REPORT = "kdpipe_pretrain.json"


@dataclass
class TrainedOnce:
    """`trained` is False when an earlier run's directory was reused."""

    path: Path
    digest: str
    trained: bool
    report: dict[str, Any] = field(default_factory=dict)


def is_trained(path: Path, report: str = REPORT) -> bool:
    return (path / report).is_file()


def train_once(path: Path, digest: str, train: Callable[[], tuple[Any, Any, dict[str, Any]]], what: str,
               report: str = REPORT, num_threads: int | None = None) -> TrainedOnce:
    """Reuse `path` when it holds a finished run of `digest`; else call `train()` -> (model,
    tokenizer, report) and save it atomically. `num_threads` sets torch's intra-op threads for the
    training only."""
    if is_trained(path, report):
        done = json.loads((path / report).read_text())
        if done.get("digest") != digest:
            raise ValueError(f"{path} holds a {what} trained with another recipe (digest {done.get('digest')}, "
                             f"recipe {done.get('recipe')}); this recipe's digest is {digest}. Delete the directory to "
                             "retrain, or point the teacher's `path:` elsewhere")
        log.info("%s %s reused (digest %s)", what, path, digest)
        return TrainedOnce(path, digest, False, done)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} exists but holds no finished {what} ({report} missing); delete it or pick another path")
    old = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        model, tok, result = train()
    finally:
        torch.set_num_threads(old)
    result["digest"] = digest
    if not save_atomically(model, tok, result, path, report):
        log.info("%s %s was finished by another process meanwhile; using it", what, path)
        return TrainedOnce(path, digest, False, json.loads((path / report).read_text()))
    return TrainedOnce(path, digest, True, result)


def optimizer_step(opt: Any, model: Any, loss: Any, lr: float) -> float:
    """One clipped AdamW step at learning rate `lr` (the recipes' training loops); the loss as a float."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def save_atomically(model: Any, tok: Any, result: dict[str, Any], path: Path, report: str = REPORT) -> bool:
    """save_pretrained + tokenizer + report into a temporary sibling, then one rename. False when
    another process finished the same directory first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / report).write_text(json.dumps(result, indent=1))
    try:
        if path.exists() and not any(path.iterdir()):  # an empty directory made by the caller
            path.rmdir()
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_trained(path, report):
            return False
        raise
    return True

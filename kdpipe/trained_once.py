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
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdpipe import storage
from kdpipe.errors import KdpipeError
from kdpipe.weights import publish_dir

log = logging.getLogger("kdpipe.trained_once")

REPORT = "kdpipe_pretrain.json"
TRAINED_PATTERNS = ("*.safetensors", "*.json", "*.bin", "*.txt", "*.model", "*.py")  # what the teachers digest


@dataclass
class TrainedOnce:
    """`trained` is False when an earlier run's directory was reused."""

    path: str  # a local path or a URI under the storage root
    digest: str
    trained: bool
    report: dict[str, Any] = field(default_factory=dict)


def is_trained(path: str | Path, report: str = REPORT) -> bool:
    return storage.exists(storage.join(str(path), report))


def _read_report(path: str, report: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(path, report)))


def train_once(
    path: str | Path,
    digest: str,
    train: Callable[[], tuple[Any, Any, dict[str, Any]]],
    what: str,
    report: str = REPORT,
    num_threads: int | None = None,
) -> TrainedOnce:
    """Reuse `path` (a local path or a URI) when it holds a finished run of `digest`; else call
    `train()` -> (model, tokenizer, report) and publish it (`kdpipe.weights.publish_dir`: one rename
    locally, the report last remotely). `num_threads` sets torch's intra-op threads for the training only."""
    path = storage.normalize(path)
    if is_trained(path, report):
        done = _read_report(path, report)
        if done.get("digest") != digest:
            raise KdpipeError(
                f"{path} holds a {what} trained with another recipe (digest {done.get('digest')}, "
                f"recipe {done.get('recipe')}); this recipe's digest is {digest}. Delete the directory to "
                "retrain, or point the teacher's `path:` elsewhere"
            )
        log.info("%s %s reused (digest %s)", what, path, digest)
        return TrainedOnce(path, digest, False, done)
    if not storage.is_remote(path) and Path(path).exists() and any(Path(path).iterdir()):
        raise KdpipeError(
            f"{path} exists but holds no finished {what} ({report} missing); delete it or pick another path"
        )
    log.info("training the %s of digest %s into %s (once: later runs reuse it)", what, digest, storage.display(path))
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
        return TrainedOnce(path, digest, False, _read_report(path, report))
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


def save_atomically(model: Any, tok: Any, result: dict[str, Any], path: str | Path, report: str = REPORT) -> bool:
    """save_pretrained + tokenizer + report into a temporary directory, then published at `path`
    (`kdpipe.weights.publish_dir`). False when another process finished the same directory first."""
    with tempfile.TemporaryDirectory(prefix="kdpipe-trained-") as d:
        tmp = Path(d) / "model"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / report).write_text(json.dumps(result, indent=1))
        return publish_dir(tmp, str(path), report, TRAINED_PATTERNS)

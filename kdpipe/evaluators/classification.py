"""Classification: accuracy of the final output and of every exit, and the figures' sums."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.evaluators import EVALUATORS
from kdpipe.evaluators.base import Evaluator, _correct, class_arrays, scalars


@EVALUATORS.register("classification")
class ClassificationEvaluator(Evaluator):
    """Accuracy of the final output and of every exit on the labeled rows, plus what the run's
    figures draw: the confusion matrix and reliability-diagram bins (summed like the counts)."""

    def batch_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = model(batch)
        labels = batch["label"]
        mask = labels >= 0
        prob = torch.softmax(out["logits"].float(), 1)
        sums: dict[str, Any] = {"n": float(mask.sum()), "acc": _correct(out["logits"], labels, mask)}
        sums.update(
            class_arrays(prob.max(1).values.numpy(), prob.argmax(1).numpy(), labels.numpy(), out["logits"].shape[1])
        )
        for i, z in enumerate(out.get("exits") or []):
            sums[f"acc_exit{i}"] = _correct(z, labels, mask)
        return sums

    def finish(self, sums: dict[str, Any], sample: dict[str, np.ndarray], prefix: str) -> dict[str, float]:
        n = sums.get("n", 0.0)
        return {f"{prefix}{k}": (v / n if n else float("nan")) for k, v in scalars(sums).items() if k != "n"}

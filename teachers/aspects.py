"""An aspect teacher: answers A yes/no aspect questions about each input from a model's beliefs.

Multi-aspect KD asks a large model questions such as "does it have a closed loop?". Here the
model is a trained classifier (an ``mlp_classifier`` weights directory at ``path``, trained by that
teacher's own ``prepare`` when missing, with ``params.classifier`` as its params) and each aspect is
a named group of classes: the answer is the classifier's belief that the input belongs to the
group, as a logit,

    aspect_a = log P(group_a) - log(1 - P(group_a)),    P = softmax(classifier logits / temperature)

so aspect targets come from the model, never from ground-truth labels. Outputs ``aspects`` (N, A)
and ``logits`` (N, C); the spec's ``outputs`` chooses which are cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from kdpipe.errors import KdpipeError
from kdpipe.spec import TeacherConfig
from teachers import TEACHERS
from teachers.base import Teacher
from teachers.mlp import MLPParams, MLPTeacher

if TYPE_CHECKING:
    from kdpipe.data import SourceData
    from kdpipe.spec import TeacherConfig


class Aspect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="the yes/no question, e.g. 'has a closed loop'")
    classes: list[int] = Field(min_length=1, description="the classes for which the answer is yes")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int]) -> list[int]:
        if any(c < 0 for c in v):
            raise ValueError("class indices must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate classes in {v}")
        return v


# Digit shapes (scikit-learn digits: class k is the digit k): questions a vision model could answer.
DIGIT_ASPECTS: list[dict[str, Any]] = [
    {"name": "has a closed loop", "classes": [0, 4, 6, 8, 9]},
    {"name": "has a straight vertical stroke", "classes": [1, 4, 7]},
    {"name": "has a curve at the bottom", "classes": [0, 2, 3, 5, 6, 8]},
    {"name": "is symmetric left-right", "classes": [0, 1, 8]},
    {"name": "has a horizontal stroke at the top", "classes": [5, 7]},
    {"name": "has a loop at the top", "classes": [8, 9]},
    {"name": "has a loop at the bottom", "classes": [6, 8]},
    {"name": "has a diagonal stroke", "classes": [2, 4, 7]},
    {"name": "has two or more bumps on the right", "classes": [3, 8]},
    {"name": "is open on the left", "classes": [2, 3, 5, 7]},
]


class AspectTeacherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    aspects: list[Aspect] = Field(
        default_factory=lambda: [Aspect(**a) for a in DIGIT_ASPECTS],
        min_length=1,
        description="ordered aspect questions, each a named group of classes",
    )
    classifier: dict[str, Any] = Field(
        default_factory=dict, description="mlp_classifier params (used to train it when missing)"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the classifier before grouping")

    @field_validator("classifier")
    @classmethod
    def _classifier(cls, v: dict[str, Any]) -> dict[str, Any]:
        return MLPParams(**v).model_dump()

    @field_validator("aspects")
    @classmethod
    def _unique(cls, v: list[Aspect]) -> list[Aspect]:
        names = [a.name for a in v]
        if len(set(names)) != len(names):
            raise ValueError(f"aspect names must be unique, got {names}")
        return v


def group_logits(logits: torch.Tensor, masks: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logit P(group) for every group: ``lse(z[group]) - lse(z[not group])`` at temperature T.

    ``masks`` is (A, C) bool; every group must be non-empty and leave at least one class out.
    """
    z = logits.float() / temperature
    neg = torch.finfo(z.dtype).min
    zin = z[:, None, :].masked_fill(~masks[None], neg).logsumexp(-1)
    zout = z[:, None, :].masked_fill(masks[None], neg).logsumexp(-1)
    return zin - zout


@TEACHERS.register("class_aspects")
class ClassAspectTeacher(Teacher):
    Params = AspectTeacherParams

    def __init__(self, classifier: MLPTeacher, params: AspectTeacherParams, device: str) -> None:
        self.classifier = classifier
        self.p = params
        self.device = device
        self.masks: torch.Tensor | None = None

    @classmethod
    def _classifier_cfg(cls, cfg: TeacherConfig) -> TeacherConfig:

        return TeacherConfig(
            id=cfg.id, kind="mlp_classifier", path=cfg.path, params=dict(cfg.params.get("classifier") or {})
        )

    @classmethod
    def prepare(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        p = AspectTeacherParams(**cfg.params)
        if source.num_classes:  # check the questions before spending time on the classifier
            for a in p.aspects:
                bad = [c for c in a.classes if c >= source.num_classes]
                if bad or len(a.classes) >= source.num_classes:
                    raise KdpipeError(
                        f"teacher '{cfg.id}': aspect '{a.name}' needs classes in [0, {source.num_classes}) "
                        f"and must leave some class out (got {a.classes})"
                    )
        clf = MLPTeacher.prepare(cls._classifier_cfg(cfg), source, storage_root)
        return cfg.model_copy(update={"path": clf.path})

    @classmethod
    def resolve(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        return cfg.model_copy(update={"path": MLPTeacher.resolve(cls._classifier_cfg(cfg), source, storage_root).path})

    @classmethod
    def load(cls, cfg: TeacherConfig, device: str = "cpu") -> ClassAspectTeacher:
        return cls(MLPTeacher.load(cls._classifier_cfg(cfg), device), AspectTeacherParams(**cfg.params), device)

    @torch.no_grad()
    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.as_tensor(np.require(batch["x"], np.float32, "W"), device=self.device)  # Arrow-backed: read-only
        z = self.classifier.net(x).float()
        if self.masks is None:
            masks = torch.zeros(len(self.p.aspects), z.shape[1], dtype=torch.bool, device=z.device)
            for i, a in enumerate(self.p.aspects):
                masks[i, a.classes] = True
            self.masks = masks
        return {"aspects": group_logits(z, self.masks, self.p.temperature).cpu().numpy(), "logits": z.cpu().numpy()}

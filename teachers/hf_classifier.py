"""A Hugging Face sequence-classification teacher (a fine-tuned BERT-style classifier).

The model is any local `AutoModelForSequenceClassification` directory (`path:`; nothing is
downloaded, `trust_remote_code` only when the spec sets it), or, with ``params.finetune:
{recipe}``, the classifier `kdpipe.finetune` makes once from all-MiniLM-L6-v2 on WordNet
glosses -> lexicographer category (into `path:` when given, else ``<finetune_root>/clf-<digest>``;
every later run reuses it).

Outputs: everything the `hf_encoder` teacher caches (``embedding`` mean-pooled from the last
hidden state, ``tokens``, ``features``, ``attn_rel``, ``value_rel``) plus the classifier's
``logits`` (N, num_labels), cached dense (``logits``) or compressed (``topk``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field

from kdpipe import storage
from kdpipe.finetune import DEFAULT_ROOT, FinetuneRecipe, finetune, finetuned_dir
from kdpipe.lm.corpus import check_holdout
from kdpipe.trained_once import is_trained
from teachers import TEACHERS
from teachers.hf_encoder import HFEncoderParams, HFEncoderTeacher

if TYPE_CHECKING:
    from kdpipe.data import SourceData
    from kdpipe.spec import TeacherConfig

SUPPORTED_OUTPUTS = {"logits", "topk", "embedding", "tokens", "features", "attn_rel", "value_rel"}


class HFClassifierParams(HFEncoderParams):
    finetune: FinetuneRecipe | None = Field(
        None,
        description="fine-tune this recipe once with kdpipe.finetune (into "
        "`path:` when set, else <finetune_root>/clf-<digest>)",
    )
    finetune_root: str | None = Field(
        None, description="where recipe-named fine-tuned teachers live (default: <storage>/teachers)"
    )


@TEACHERS.register("hf_classifier")
class HFClassifierTeacher(HFEncoderTeacher):
    Params = HFClassifierParams

    supported_outputs = SUPPORTED_OUTPUTS

    @staticmethod
    def model_dir(cfg: TeacherConfig) -> str:
        """`path:`, else the fine-tuning recipe's digest directory (a path or a URI)."""
        p = HFClassifierParams(**cfg.params)
        if cfg.path:
            return cfg.path
        if p.finetune is None:
            raise ValueError(
                f"teacher '{cfg.id}' (hf_classifier): set `path:` (a sequence-classification model "
                "directory) or `params.finetune:` (a recipe to fine-tune one on WordNet glosses)"
            )
        return finetuned_dir(p.finetune, p.finetune_root or DEFAULT_ROOT)

    @classmethod
    def default_path(cls, cfg: TeacherConfig, storage_root: str) -> str | None:
        p = HFClassifierParams(**cfg.params)
        if p.finetune is None:
            return None
        return finetuned_dir(p.finetune, p.finetune_root or storage.Layout(storage_root).teachers)

    @classmethod
    def check_config(cls, cfg: TeacherConfig) -> None:
        p = HFClassifierParams(**cfg.params)
        bad = sorted(set(cfg.outputs) - SUPPORTED_OUTPUTS)
        if bad:
            raise ValueError(
                f"teacher kind hf_classifier cannot produce outputs {bad}; choose from {sorted(SUPPORTED_OUTPUTS)}"
            )
        if "features" in cfg.outputs and not p.layers:
            raise ValueError(
                "outputs include 'features': set params.layers (hidden-state layers to cache, 0 = embeddings)"
            )
        loc = cls.model_dir(cfg)
        if p.finetune is None:
            if storage.is_remote(loc):  # read where the teacher is fetched (once per node), not at spec time
                return
            d = Path(loc)
            if not (d / "config.json").is_file():
                raise ValueError(
                    f"teacher '{cfg.id}': path '{d}' is not a Hugging Face model directory (no config.json); "
                    "point `path:` at a saved sequence classifier or set params.finetune to train one"
                )
            conf = json.loads((d / "config.json").read_text())
            if not any(a.endswith("ForSequenceClassification") for a in conf.get("architectures") or []):
                raise ValueError(
                    f"teacher '{cfg.id}': '{d}' holds a {conf.get('architectures')} model, not a sequence "
                    "classifier; use kind hf_encoder for a plain encoder"
                )
            n_layers = conf.get("num_hidden_layers")
        else:
            base = json.loads((p.finetune.base_dir() / "config.json").read_text())
            n_layers = base.get("num_hidden_layers")
        if n_layers is not None and any(not 0 <= l <= n_layers for l in p.layers):
            raise ValueError(f"params.layers {p.layers}: this model has layers 0..{n_layers} (0 = embedding output)")

    @classmethod
    def prepare(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        """Fine-tune the recipe's classifier if it does not exist yet (driver side, once)."""
        cfg = super().prepare(cfg, source, storage_root)
        p = HFClassifierParams(**cfg.params)
        if p.finetune is not None:
            check_holdout(cfg.id, "params.finetune.split", p.finetune.split, source)
            finetune(p.finetune, out_dir=cfg.path)
        return cfg

    @classmethod
    def resolve(cls, cfg: TeacherConfig, source: SourceData, storage_root: str) -> TeacherConfig:
        return cfg if cfg.path else cfg.model_copy(update={"path": cls.default_path(cfg, storage_root)})

    @classmethod
    def load(cls, cfg: TeacherConfig, device: str = "cpu") -> HFClassifierTeacher:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        d = Path(cls.model_dir(cfg))  # local: the actor fetched a remote directory to this node first
        p = HFClassifierParams(**cfg.params)
        if p.finetune is not None and not is_trained(d):
            raise FileNotFoundError(
                f"teacher '{cfg.id}': no fine-tuned classifier at {d}; run `kdpipe teach SPEC` to train it"
            )
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            d, local_files_only=True, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32
        )
        return cls(model, tok, p, list(cfg.outputs), device)

    def run_model(
        self, enc: dict[str, torch.Tensor], need_hidden: bool
    ) -> tuple[torch.Tensor, Any, dict[str, np.ndarray]]:
        out = self.model(**enc, output_hidden_states=True)  # the classifier's output has no last_hidden_state
        return out.hidden_states[-1].float(), out.hidden_states, {"logits": out.logits.float().cpu().numpy()}

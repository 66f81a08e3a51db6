"""The pipeline spec's schema: typed, validated at load time, errors point at the YAML key.

This module knows the shape of a spec and nothing of the plugins (teacher, student, loss and
evaluator registries): it imports no torch, so a spec's structure is checked in a fraction of a
second. The checks that need the plugins (does this loss exist, are its params valid, does the
teacher emit what it reads) run above the registries, in `kdpipe.config.check_spec`.

Paths: data paths a spec names (`source.path`, `teachers[].path`) resolve against the spec
file's folder; kdpipe's own artefacts (caches, trained teachers, checkpoints, index, quarantine)
live under the storage root `storage:`, which resolves against the working directory.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdpipe.errors import KdpipeError, SpecError
from kdpipe.plugins import name_errors

__all__ = ["KdpipeError", "SpecError"]  # re-exported for callers that catch both from the spec


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class SplitConfig(Strict):
    """Hash-based split: a row's split depends only on its id, so new rows never reshuffle old ones."""

    val: float = Field(0.15, ge=0.0, lt=1.0, description="share of rows in the validation split")
    test: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description="share of rows held out for the test split (every model is compared there: it cannot be empty)",
    )
    labeled_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="share of the labeled train rows whose label the models may see (an experiment setting: "
        "below 1, the other labels are hidden from the teacher, the student and its twin)",
    )
    salt: str = Field("kdpipe", description="changes which rows land in which split")

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must be < 1 (the rest is the train split)")
        return self

    def id_settings(self) -> dict[str, Any]:
        """What decides a row's split (not which labels are visible): what models must agree on to be compared."""
        return {"val": self.val, "test": self.test, "salt": self.salt}


class FeatureSelector(Strict):
    """Feature columns chosen by name pattern (a wide table: one column per feature)."""

    prefix: str | None = Field(None, description="every column whose name starts with this")
    regex: str | None = Field(None, description="every column whose whole name matches this regular expression")
    exclude: list[str] = Field(default_factory=list, description="columns to leave out of the match")

    @model_validator(mode="after")
    def _one(self) -> FeatureSelector:
        if (self.prefix is None) == (self.regex is None):
            raise ValueError("give exactly one of `prefix:` or `regex:` (with an optional `exclude:` list)")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} is not a valid regular expression ({e})") from None
        return self

    def select(self, columns: list[str]) -> list[str]:
        """The matching columns, in the table's order."""
        if self.prefix is not None:
            hit = [c for c in columns if c.startswith(self.prefix)]
        else:
            pattern = re.compile(self.regex or "")
            hit = [c for c in columns if pattern.fullmatch(c)]
        return [c for c in hit if c not in set(self.exclude)]


SOURCE_KINDS = ("sklearn_digits", "parquet", "jsonl", "csv", "text", "wordnet")


class SourceConfig(Strict):
    kind: Literal["sklearn_digits", "parquet", "jsonl", "csv", "text", "wordnet"] = Field(
        description="sklearn_digits and wordnet are built in; the others read `path:`"
    )
    path: str | None = Field(
        None,
        description="file, directory or glob (a URI such as s3://bucket/data/*.parquet "
        "works too); relative to the spec file's folder",
    )
    features: str | list[str] | FeatureSelector | None = Field(
        None,
        description="the numeric inputs: a list of columns (a wide table), a selector "
        "`{prefix: sensor_, exclude: [...]}` or `{regex: ...}`, or the name of one column holding "
        "a vector (a list in Parquet/JSON; `[0.1, 0.2]` or `0.1 0.2` in a CSV cell)",
    )
    text: str | None = Field(None, description="column holding text")
    label: str | None = Field(
        None,
        description="column holding the class label (optional; null/empty = unlabeled): "
        "integer ids, or names mapped to ids (see `classes:`)",
    )
    classes: list[str] | None = Field(
        None,
        description="the class names in id order, when labels are names; "
        "default: the sorted distinct names found in the data",
    )
    num_classes: int | None = Field(None, ge=2, description="default: largest label id + 1 (or the number of names)")
    id_column: str | None = Field(
        None,
        description="a column that identifies each row (stable across formats and "
        "edits of other columns); default: a hash of the row's input. "
        "A repeated value is a bad row",
    )
    split: SplitConfig = SplitConfig()
    on_bad_rows: Literal["fail", "skip"] = Field(
        "fail",
        description="fail: stop at the first bad row (with its "
        "file, row and reason); skip: quarantine bad rows and go on",
    )
    max_text_chars: int = Field(4000, ge=1)
    limit: int | None = Field(None, ge=1, description="read at most this many rows (smoke runs)")

    @model_validator(mode="after")
    def _paths(self) -> SourceConfig:
        if self.kind in ("sklearn_digits", "wordnet"):
            return self
        if not self.path:
            raise ValueError(f"source kind '{self.kind}' needs `path:` (a file, directory or glob)")
        if self.kind != "text" and not (self.features or self.text):
            raise ValueError("set `features:` (numeric columns, or one vector column) or `text:` (a text column)")
        if isinstance(self.features, list) and not self.features:
            raise ValueError("features: an empty list; name at least one column")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes: names must be distinct, got {self.classes}")
        return self

    @property
    def wide(self) -> bool:
        """Features spread over several columns (a list or a selector), not one vector column."""
        return isinstance(self.features, (list, FeatureSelector))

    def id_scheme(self) -> str:
        """How row ids are made: what two runs must share for their splits (a function of the id) to agree."""
        return f"column:{self.id_column}" if self.id_column else "content-sha256"


class TeacherConfig(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="names the teacher's cache columns `<id>.<output>`")
    kind: str = Field(
        description="a registered teacher kind (`kdpipe plugins` lists them): mlp_classifier, hf_encoder, …"
    )
    path: str | None = Field(
        None,
        description="a weights directory you provide (a path relative to the spec's "
        "folder, or a URI); teachers kdpipe trains itself live under "
        "`storage:` when it is unset",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the teacher kind's own settings")
    outputs: list[
        Literal["logits", "topk", "features", "embedding", "aspects", "attn_rel", "value_rel", "tokens", "hidden"]
    ] = Field(["logits"], description="what is cached per row")
    topk: int | None = Field(None, ge=1, description="logits kept per row (per token for language models) with `topk`")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _topk(self) -> TeacherConfig:
        if "topk" in self.outputs and self.topk is None:
            raise ValueError("outputs include 'topk': set `topk: K` (number of logits kept per row)")
        return self


class FusionConfig(Strict):
    """Teacher-side logit fusion written as an extra `fused` teacher in the cache join."""

    mode: Literal["static", "uniform", "dynamic"] = "dynamic"
    teachers: list[str]
    weights: list[float] | None = None
    steps: int = Field(50, ge=1)
    temperature: float = Field(1.0, gt=0)
    sharpness: float = Field(
        0.5, ge=0, description="λ of dynamic fusion (how decided the fused answer may get); 0 = uniform average"
    )

    @model_validator(mode="after")
    def _w(self) -> FusionConfig:
        if self.mode == "static":
            if self.weights is None or len(self.weights) != len(self.teachers):
                raise ValueError("fusion mode 'static' needs `weights:` with one weight per teacher")
        return self


class TeachConfig(Strict):
    concurrency: int = Field(1, ge=1, description="teacher actors per teacher (actor pool size)")
    batch_size: int = Field(256, ge=1)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per teacher actor; > 0 runs the teacher on CUDA")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per teacher actor")
    verify: bool = Field(True, description="check every cache file against its checksum before a stage reads it")
    fusion: FusionConfig | None = None


class StudentConfig(Strict):
    kind: str = Field(
        description="a registered student kind: mlp, multi_exit_mlp, hf_encoder, hf_classifier, causal_lm, …"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the student kind's own settings")


class LossConfig(BaseModel):
    """`{name, weight, **params}`; params are checked by the loss's own `Params` model (kdpipe.config)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="a registered loss: kd, dkd, ce, feature_mse, forward_kl, jsd, …")
    weight: float = 1.0

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="default: on up to 4 CPUs, half the cluster's CPUs split across the workers; on more, "
        "all but 2 split across them: Ray Data keeps CPUs to feed them",
    )
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="training step precision: auto = bf16 autocast on a CUDA device that has bf16, else fp32 "
        "(always fp32 on CPU); weights and optimizer state stay fp32",
    )
    max_failures: int = Field(
        1, ge=0, description="worker-group restarts Ray Train may make (each resumes from the last checkpoint)"
    )
    checkpoint_every: int = Field(
        5, ge=1, description="epochs between Ray Train checkpoints (the last epoch always checkpoints)"
    )
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant, or linear decay to 0 by the last step (after the warm-up)"
    )
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of the run's optimizer steps over which the lr "
        "rises linearly from 0 (BERT-style fine-tuning needs it)",
    )
    keep_in_memory_mb: float = Field(
        256,
        ge=0,
        description="a view of at most this many MB reaches every training "
        "worker whole, each keeps its equal share in memory (no split coordinator); a "
        "bigger one is split by Ray Data, and a worker keeps its shard in memory after the "
        "first epoch when every worker's fits (later epochs skip Ray Data); 0: stream every epoch",
    )
    shuffle_buffer: int = Field(
        0,
        ge=0,
        description="rows in Ray Data's local shuffle buffer, reseeded every epoch "
        "(0: the same batch order every epoch)",
    )
    unlabeled_split: Literal["train"] = "train"

    @model_validator(mode="after")
    def _precision(self) -> TrainConfig:
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision bf16 needs `use_gpu: true` (this CPU has no bf16 units); use auto or fp32")
        return self


class EvaluateConfig(Strict):
    """Held-out evaluation, and the twin the student must beat (by default: same student, labels only)."""

    task: str = Field("classification", description="evaluator name: classification | embedding | lm")
    baseline: bool = Field(True, description="also train a baseline twin of the student")
    baseline_epochs: int | None = Field(None, ge=1)
    baseline_losses: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "ce", "weight": 1.0}])
    baseline_student_params: dict[str, Any] = Field(
        default_factory=dict, description="overrides of student.params for the twin"
    )
    baseline_labeled_only: bool = Field(True, description="train the twin on the labeled train rows only")
    slices: dict[str, list[int]] = Field(
        default_factory=dict,
        description="named groups of labels, each scored on its own as well: "
        "`{nouns: ['3-28'], verbs: ['29-43']}` adds test_nouns_<metric> and test_verbs_<metric>",
    )

    @field_validator("slices", mode="before")
    @classmethod
    def _slices(cls, v: Any) -> Any:
        """Label ids, or `"a-b"` ranges of them (inclusive); names become part of metric names."""
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of slice name -> list of labels, e.g. {nouns: ['3-28']}")
        out = {}
        for name, labels in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)):
                raise ValueError(
                    f"slice name {name!r}: use lowercase letters, digits and _ (it becomes part of metric names)"
                )
            if str(name).startswith(("teacher", "baseline", "champion")):  # test_teacher_ppl is the teacher's, …
                raise ValueError(
                    f"slice name {name!r}: names starting with teacher, baseline or champion would "
                    "collide with those models' metric names; choose another"
                )
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
                    raise ValueError(
                        f"slice {name!r}: {item!r} is neither a label id (int >= 0) nor a range 'a-b' with a <= b"
                    )
            out[name] = sorted(set(ids))
        return out

    @field_validator("baseline_losses")
    @classmethod
    def _losses(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, item in enumerate(v):
            try:
                LossConfig.model_validate(item)
            except ValidationError as e:
                raise ValueError(f"[{i}]: {format_errors(e)}") from None
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
    metric: str = Field("test_acc", description="the held-out metric the gates compare (higher is better)")
    min_value: float | None = None
    min_gain_over_baseline: float | None = 0.0
    min_gain_over_champion: float = 0.0


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlruns.db")
    experiment: str = "kdpipe"
    model_name: str = Field(pattern=r"^[A-Za-z0-9_\-\.]+$", description="the registered model's name")
    alias: str = Field("champion", description="the alias a passing student is promoted to")
    gates: GateConfig = GateConfig()


# keys that moved: a spec that still sets them gets told where they went, not "unknown key"
MOVED = {
    (
        "teach",
        "cache_root",
    ): "caches live under the top-level `storage:` root (<storage>/cache); set `storage:` instead",
    ("train", "storage_path"): "Ray Train's checkpoints live under the top-level `storage:` root "
    "(<storage>/ray_results); set `storage:` instead",
}


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    seed: int = Field(0, description="student initialisation, and the shuffle order when train.shuffle_buffer > 0")
    storage: str = Field(
        ".kdpipe",
        description="the storage root: caches, trained teachers, checkpoints, index and "
        "quarantine live under it. A local path (relative to the working "
        "directory) for one machine; on a cluster a URI every node reaches "
        "(s3://bucket/kdpipe, gs://…) or a shared filesystem",
    )
    source: SourceConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    teach: TeachConfig = TeachConfig()
    student: StudentConfig
    losses: list[LossConfig] = Field(min_length=1)
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    m2mkd: M2MConfig | None = None
    tracking: TrackingConfig

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for (section, key), where in MOVED.items():
                if isinstance(data.get(section), dict) and key in data[section]:
                    raise ValueError(f"{section}.{key} was removed: {where}")
        return data

    @model_validator(mode="after")
    def _refs(self) -> PipelineConfig:
        ids = [t.id for t in self.teachers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"teacher ids must be unique, got {ids}")
        known = set(ids) | ({"fused"} if self.teach.fusion else set())
        if self.teach.fusion:
            for t in self.teach.fusion.teachers:
                if t not in ids:
                    raise ValueError(f"teach.fusion.teachers names unknown teacher '{t}'; defined: {ids}")
        for i, loss in enumerate(self.losses):
            ref = loss.params().get("teacher")
            if ref is not None and ref not in known:
                raise ValueError(f"losses[{i}].teacher '{ref}' is not a teacher id; defined: {sorted(known)}")
            for ref in loss.params().get("teachers", []) or []:
                if ref not in known:
                    raise ValueError(f"losses[{i}].teachers names unknown teacher '{ref}'; defined: {sorted(known)}")
        if self.m2mkd is not None and self.m2mkd.teacher not in ids:
            raise ValueError(f"m2mkd.teacher '{self.m2mkd.teacher}' is not a teacher id; defined: {ids}")
        return self

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]

    def teacher(self, tid: str) -> TeacherConfig:
        return next(t for t in self.teachers if t.id == tid)

    def teacher_ids(self) -> list[str]:
        """The teachers the cache join holds: the spec's, plus `fused` with fusion."""
        return [t.id for t in self.teachers] + (["fused"] if self.teach.fusion else [])


# ------------------------------------------------------------------ errors that name the key


def format_errors(e: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in e.errors():
        loc = _loc(err["loc"], prefix)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/spec.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        got = err.get("input")
        tail = (
            f" (got {got!r})"
            if err["type"] not in ("missing",) and not isinstance(got, dict) and got is not None
            else ""
        )
        if len(tail) > 200:
            tail = tail[:197] + "…)"
        lines.append(f"{loc}: {msg}{tail}" if loc else f"{msg}{tail}")
    return "; ".join(dict.fromkeys(lines))


def _loc(loc: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            str(part).startswith("function-")
            or part in ("model", "after")
            or str(part).startswith(("list[", "str", "FeatureSelector"))
        ):
            continue  # the branch of a union pydantic tried, not a key of the spec
        else:
            out += f".{part}" if out else str(part)
    return out


def validate_params(model: type[BaseModel], params: dict[str, Any], where: str) -> dict[str, Any]:
    """A plugin's params through its own `Params` model, with its defaults filled in; errors name `where`."""
    try:
        return model(**params).model_dump()
    except ValidationError as e:
        raise ValueError(format_errors(e, prefix=where)) from None


# ------------------------------------------------------------------ reading a spec


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


def is_uri(loc: str) -> bool:
    return "://" in loc and not loc.startswith("file://")


def resolve_against(loc: str | None, base: Path) -> str | None:
    """A relative local path as an absolute one under `base`; URIs and absolute paths as given."""
    if loc is None or is_uri(loc):
        return loc
    if loc.startswith("file://"):
        return loc[len("file://") :]
    p = Path(loc).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(cfg: PipelineConfig, spec_dir: Path, cwd: Path | None = None) -> PipelineConfig:
    """Data paths against the spec's folder, the storage root against the working directory."""
    cwd = cwd or Path.cwd()
    cfg.source.path = resolve_against(cfg.source.path, spec_dir)
    for t in cfg.teachers:
        t.path = resolve_against(t.path, spec_dir)
    cfg.storage = resolve_against(cfg.storage, cwd) or cfg.storage
    if is_uri(cfg.storage):
        cfg.storage = cfg.storage.rstrip("/")
    return cfg


def check_source_found(cfg: PipelineConfig, origin: str = "<spec>") -> None:
    """A local `source.path` that names nothing is a spec error, found before anything starts. URIs
    are left to the run (reaching a bucket needs its filesystem and credentials)."""
    loc = cfg.source.path
    if loc is None or is_uri(loc):
        return
    found = glob.glob(loc, recursive=True) if glob.has_magic(loc) else ([loc] if os.path.exists(loc) else [])
    if not found:
        raise SpecError(
            f"{origin}: source.path: '{loc}' not found (relative paths are read from the spec file's "
            "folder); point it at a file, a directory or a glob that matches files"
        )


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file '{path}' not found; pass a YAML file such as pipelines/digits_kd.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(
            f"{path}: the spec must be a YAML mapping with keys name, source, teachers, student, losses, tracking"
        )
    return raw


def read_spec(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Schema only (no plugins imported): data paths resolved against the spec file's folder."""
    return parse_schema(read_yaml(path), overrides, origin=str(path), spec_dir=Path(path).resolve().parent)


def parse_schema(
    raw: dict[str, Any], overrides: dict[str, Any] | None = None, origin: str = "<spec>", spec_dir: Path | None = None
) -> PipelineConfig:
    if overrides:
        try:
            raw = _apply_overrides(raw, overrides)
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise SpecError(f"{origin}: cannot apply overrides {overrides}: {e}") from None
    names = name_errors(raw)  # unknown plugin names, from the plugins' source: reported with the schema's errors
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{origin}: {'; '.join([format_errors(e), *names])}") from None
    if names:
        raise SpecError(f"{origin}: {'; '.join(names)}")
    return resolve_paths(cfg, spec_dir or Path.cwd())

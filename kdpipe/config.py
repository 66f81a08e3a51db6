"""The spec check above the plugins: kinds exist, params are valid, every loss finds what it reads.

`kdpipe.spec` checks a spec's shape without importing a plugin; this module imports the teacher,
student, loss and evaluator registries and checks the spec against them:

- every teacher, student, loss and evaluator name is registered, and its params pass its own
  `Params` model (defaults filled in, errors named `teachers[0].params.hidden`);
- teachers produce only the outputs their kind supports (`Teacher.supported_outputs`), and every
  loss finds the teacher outputs it declares it reads (`Loss.teacher_reads`);
- a teacher kdpipe trains from a recipe gets its directory under the storage root, and a
  Hugging Face student takes its architecture from the teacher it reads its tokens from.

`load_spec` = `kdpipe.spec.read_spec` (schema) + `check_spec` (plugins): what every command runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError, SpecError
from kdpipe.evaluators import EVALUATORS
from kdpipe.losses import LOSSES
from kdpipe.spec import (
    EvaluateConfig,
    FeatureSelector,
    FusionConfig,
    GateConfig,
    LossConfig,
    M2MConfig,
    PipelineConfig,
    SourceConfig,
    SplitConfig,
    StudentConfig,
    TeachConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
    parse_override,
    parse_schema,
    read_spec,
    validate_params,
)
from students import STUDENTS
from teachers import TEACHERS

__all__ = [
    "EvaluateConfig",
    "FeatureSelector",
    "FusionConfig",
    "GateConfig",
    "KdpipeError",
    "LossConfig",
    "M2MConfig",
    "PipelineConfig",
    "SourceConfig",
    "SpecError",
    "SplitConfig",
    "StudentConfig",
    "TeachConfig",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "check_spec",
    "check_student",
    "check_teacher",
    "load_spec",
    "parse_override",
    "parse_spec",
]


def load_spec(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read, validate and check a pipeline spec; raises SpecError before any compute starts."""
    return check_spec(read_spec(path, overrides), origin=str(path))


def parse_spec(
    raw: dict[str, Any], overrides: dict[str, Any] | None = None, origin: str = "<spec>", spec_dir: Path | None = None
) -> PipelineConfig:
    """A spec from a mapping (tests, benchmarks): relative data paths resolve against `spec_dir` (default: cwd)."""
    return check_spec(parse_schema(raw, overrides, origin, spec_dir), origin=origin)


def check_spec(cfg: PipelineConfig, origin: str = "<spec>") -> PipelineConfig:
    """`cfg` with every plugin's params validated and defaults filled in; SpecError names the key."""
    try:
        _check(cfg)
    except (ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise SpecError(f"{origin}: {msg}") from None
    return cfg


def _check(cfg: PipelineConfig) -> None:
    for i, t in enumerate(cfg.teachers):
        check_teacher(t, cfg.storage, f"teachers[{i}]")
    _check_student(cfg)
    outputs = _teacher_outputs(cfg)
    for i, loss in enumerate(cfg.losses):
        _check_loss(loss, f"losses[{i}]", outputs)
    ev = cfg.evaluate
    _registered(EVALUATORS, ev.task, "evaluate.task")
    for i, item in enumerate(ev.baseline_losses):
        loss = LossConfig.model_validate(item)
        _check_loss(loss, f"evaluate.baseline_losses[{i}]", outputs)


def _registered(registry: Any, name: str, where: str) -> None:
    try:
        registry.check(name)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def check_teacher(t: TeacherConfig, storage_root: str, where: str = "teacher") -> TeacherConfig:
    """A teacher's kind, params and outputs checked by its kind; a teacher trained from a recipe
    gets its directory under the storage root when the spec gives no `path:`."""
    _registered(TEACHERS, t.kind, f"{where}.kind")
    cls = TEACHERS.get(t.kind)
    t.params = validate_params(cls.Params, t.params, f"{where}.params")
    bad = sorted(set(t.outputs) - cls.supported_outputs) if cls.supported_outputs is not None else []
    if bad:
        raise ValueError(
            f"{where}.outputs: teacher kind {t.kind} cannot produce outputs {bad}; choose from "
            f"{sorted(cls.supported_outputs or [])}"
        )
    if t.path is None:
        t.path = cls.default_path(t, storage_root)
    try:
        cls.check_config(t)
    except ValueError as e:
        raise ValueError(f"{where} ({t.id}): {e}") from None
    return t


def check_student(s: StudentConfig, where: str = "student") -> StudentConfig:
    """A student's kind and params checked by its kind (defaults filled in)."""
    _registered(STUDENTS, s.kind, f"{where}.kind")
    s.params = validate_params(STUDENTS.get(s.kind).Params, s.params, f"{where}.params")
    return s


def _check_student(cfg: PipelineConfig) -> None:
    s = cfg.student
    _registered(STUDENTS, s.kind, "student.kind")
    params_model = STUDENTS.get(s.kind).Params
    if "teacher_path" in params_model.model_fields and not s.params.get("teacher_path"):
        _default_teacher_path(cfg)
    s.params = validate_params(params_model, s.params, "student.params")
    if cfg.evaluate.baseline_student_params:  # the twin's params must be valid for the same student kind
        validate_params(
            params_model, {**s.params, **cfg.evaluate.baseline_student_params}, "evaluate.baseline_student_params"
        )


def _default_teacher_path(cfg: PipelineConfig) -> None:
    """A Hugging Face student reads its architecture, tokenizer (and initial layers) from the
    teacher it takes its tokens from: `student.params.teacher_path` defaults to that teacher's
    model directory (a path, a package's model, or the directory a recipe trains once)."""
    src = next((t for t in cfg.teachers if t.id == cfg.student.params.get("tokens_from")), None)
    if src is None:
        return
    cls = TEACHERS.get(src.kind)
    model_dir = getattr(cls, "model_dir", None)
    if model_dir is None:
        return
    cfg.student.params = {**cfg.student.params, "teacher_path": str(model_dir(src))}


def _teacher_outputs(cfg: PipelineConfig) -> dict[str, set[str]]:
    """What each teacher id's cache holds; the fused cache holds what its members share (per-token
    top-k, or class logits)."""
    outputs = {t.id: set(t.outputs) for t in cfg.teachers}
    if cfg.teach.fusion:
        members = [outputs[t] for t in cfg.teach.fusion.teachers]
        outputs["fused"] = {"tokens", "topk"} if all({"tokens", "topk"} <= m for m in members) else {"logits"}
    return outputs


def _check_loss(loss: LossConfig, where: str, outputs: dict[str, set[str]]) -> None:
    _registered(LOSSES, loss.name, f"{where}.name")
    cls = LOSSES.get(loss.name)
    params = cls.Params(**validate_params(cls.Params, loss.params(), where))
    known = sorted(outputs)
    if "teacher" in cls.Params.model_fields and getattr(params, "teacher", None) is None and len(known) > 1:
        raise ValueError(f"{where} ({loss.name}): several teachers {known}; set `teacher:` on the loss")
    reads = cls.teacher_reads(params)
    if not reads:
        return
    named = list(getattr(params, "teachers", None) or []) or [getattr(params, "teacher", None) or known[0]]
    for tid in named:
        missing = sorted(reads - outputs.get(tid, set()))
        if missing:
            hint = ""
            if "logits" in missing and "topk" in outputs.get(tid, set()) and "use_topk" in cls.Params.model_fields:
                hint = " or set use_topk: true"
            raise ValueError(
                f"{where} ({loss.name}) reads teacher '{tid}' outputs {sorted(reads)}; add {missing} to "
                f"its outputs{hint}"
            )


def check_plugins_ok() -> None:
    """Raise KdpipeError when a registry is empty (a broken install), for `kdpipe validate`."""
    for reg in (TEACHERS, STUDENTS, LOSSES, EVALUATORS):
        if not reg.names():
            raise KdpipeError(f"no {reg.kind} is registered: the installation is broken; run `make install`")

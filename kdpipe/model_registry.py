"""Ship: log the student, register a version with lineage tags, promote an alias only past the gates."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.config import GateConfig

log = logging.getLogger("kdpipe.registry")


class InferenceModel(nn.Module):
    """Serving signature: the student's `serving_inputs` tensors (default `x`) -> its `serving_output`
    (default `logits`); this is what `models:/NAME@ALIAS` returns."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.inputs = list(getattr(student, "serving_inputs", ["x"]))
        self.output = getattr(student, "serving_output", "logits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student({self.inputs[0]: x})[self.output]


class MultiInputModel(InferenceModel):
    """For students that serve on several tensors (token ids + mask); logged with pickle serialization."""

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.student(dict(zip(self.inputs, tensors)))[self.output]


@dataclass
class GateResult:
    passed: bool
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reasons(self) -> str:
        bad = [f"{k}: {v['value']:.4f} {'<=' if v.get('strict') else '<'} {v['threshold']:.4f}"
               for k, v in self.checks.items() if not v["passed"]]
        return "all gates passed" if not bad else "; ".join(bad)


def evaluate_gates(metrics: dict[str, float], gates: GateConfig, baseline: float | None, champion: float | None) -> GateResult:
    value = metrics[gates.metric]
    checks: dict[str, dict[str, Any]] = {}

    def add(name: str, threshold: float, strict: bool = False) -> None:
        ok = value > threshold if strict else value >= threshold
        checks[name] = {"value": value, "threshold": threshold, "passed": bool(ok), "strict": strict}

    if gates.min_value is not None:
        add("min_value", gates.min_value)
    if gates.min_gain_over_baseline is not None and baseline is not None:
        add("over_baseline", baseline + gates.min_gain_over_baseline)
    if champion is not None:  # a tie keeps the champion: the alias moves only for a real win
        add("over_champion", champion + gates.min_gain_over_champion, strict=True)
    return GateResult(all(c["passed"] for c in checks.values()), checks)


def log_and_register(
    run_id: str, student: nn.Module, example: dict[str, np.ndarray], model_name: str, tags: dict[str, str]
) -> Any:
    """Log with `mlflow.pytorch` (signature from the example) and register a new version; a
    Hugging Face student (one with `hf_model`) is logged with `mlflow.transformers` instead."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    if hasattr(student, "hf_model"):
        return _log_transformers(run_id, student, model_name, tags)

    single = len(getattr(student, "serving_inputs", ["x"])) == 1
    model = (InferenceModel(student) if single else MultiInputModel(student)).eval()
    arrays = [example[k] for k in model.inputs]
    with torch.no_grad():
        out = model(*[torch.from_numpy(a) for a in arrays]).numpy()
    extra: dict[str, Any] = {"input_example": arrays[0]} if single else {"serialization_format": "pickle"}
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name="student", signature=infer_signature(arrays[0] if single else example, out), **extra,
            registered_model_name=model_name, await_registration_for=60,
        )
    client = MlflowClient()
    version = info.registered_model_version
    for k, v in tags.items():
        client.set_model_version_tag(model_name, str(version), k, str(v))
    return client.get_model_version(model_name, str(version))


def _log_transformers(run_id: str, student: nn.Module, model_name: str, tags: dict[str, str]) -> Any:
    """A Hugging Face student as a `text-generation` model: `save_pretrained` weights (safetensors)
    + tokenizer, so `mlflow.transformers.load_model("models:/NAME@ALIAS")` gives a working pipeline
    and `AutoModelForCausalLM.from_pretrained(<artifact>/model)` loads it; no pickles."""
    import mlflow
    from mlflow.tracking import MlflowClient

    hf = student.hf_model.eval()  # type: ignore[attr-defined]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            {"model": hf, "tokenizer": student.tokenizer}, name="student", task="text-generation",  # type: ignore[attr-defined]
            registered_model_name=model_name, await_registration_for=60, pip_requirements=_hf_requirements())
    client = MlflowClient()
    version = info.registered_model_version
    for k, v in {**tags, "kdpipe.flavor": "transformers"}.items():
        client.set_model_version_tag(model_name, str(version), k, str(v))
    return client.get_model_version(model_name, str(version))


def _hf_requirements() -> list[str]:
    """What serving the model needs, pinned to what trained it (MLflow's own inference adds torchvision,
    which a text model does not use and this stack does not install)."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in ("torch", "transformers", "tokenizers", "safetensors")]


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(client: Any, name: str, version: str, alias: str) -> None:
    client.set_registered_model_alias(name, alias, str(version))
    log.info("model %s: alias '%s' -> version %s", name, alias, version)


class ServedStudent(nn.Module):
    """A registered model (as `mlflow.pytorch.load_model` returns it) behind the student interface,
    so the champion is evaluated by the same evaluator, on the same rows, as the challenger."""

    def __init__(self, model: nn.Module, inputs: list[str], output: str) -> None:
        super().__init__()
        self.model, self.inputs, self.output = model, inputs, output

    def train(self, mode: bool = True) -> "ServedStudent":
        # exported (pt2) programs refuse .train()/.eval(); they are inference-only already
        self.training = mode
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.output: self.model(*[batch[k] for k in self.inputs])}


def load_served(version: Any) -> ServedStudent:
    import json

    import mlflow.pytorch

    tags = version.tags or {}
    inputs = json.loads(tags.get("kdpipe.serving_inputs", '["x"]'))
    output = tags.get("kdpipe.serving_output", "logits")
    uri = f"models:/{version.name}/{version.version}"
    if tags.get("kdpipe.flavor") == "transformers":
        import mlflow.transformers

        hf = mlflow.transformers.load_model(uri, return_type="components")["model"].eval()
        return ServedStudent(HFLogits(hf), inputs, output)
    model = mlflow.pytorch.load_model(uri)
    return ServedStudent(model, inputs, output)


class HFLogits(nn.Module):
    """A loaded Hugging Face causal LM as (input_ids, attention_mask) -> logits, the serving
    signature the champion is re-scored through."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.long(), attention_mask=attention_mask.long(), use_cache=False).logits


class RegisteredFactory:
    """Loads a registered version where it is called (an evaluation actor): only the tracking
    URI, name and version cross the Ray boundary, never the model object."""

    def __init__(self, tracking_uri: str, name: str, version: str) -> None:
        self.uri, self.name, self.version = tracking_uri, name, version

    def __call__(self) -> ServedStudent:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        return load_served(MlflowClient(self.uri).get_model_version(self.name, self.version))


STATE_ARTIFACT = "student_state/model.safetensors"


def log_student_state(client: Any, run_id: str, state: dict[str, torch.Tensor]) -> None:
    """The raw student weights beside the served model: what a warm-started retrain loads."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))  # tied weights: own copies
        client.log_artifact(run_id, str(path), "student_state")


def load_student_state(client: Any, run_id: str) -> dict[str, torch.Tensor]:
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        return load_file(client.download_artifacts(run_id, STATE_ARTIFACT, d))

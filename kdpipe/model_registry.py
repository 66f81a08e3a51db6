"""Ship: log the student, register a version with lineage tags, promote an alias only past the gates."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe import tracking
from kdpipe.errors import KdpipeError
from kdpipe.spec import GateConfig
from kdpipe.train import StudentMeta, build_student

log = logging.getLogger("kdpipe.registry")


class InferenceModel(nn.Module):
    """Serving signature: the student's `serving_inputs` tensors (default `x`) -> its `serving_output`
    (default `logits`); what the exported program serves (`models:/NAME@ALIAS` through mlflow.pytorch)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.inputs = list(getattr(student, "serving_inputs", ["x"]))
        self.output = getattr(student, "serving_output", "logits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student({self.inputs[0]: x})[self.output]


class TokenInputModel(InferenceModel):
    """For students that serve on (input_ids, attention_mask): named arguments, so torch.export
    sees two inputs with a dynamic batch and sequence length."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.student({self.inputs[0]: input_ids, self.inputs[1]: attention_mask})[self.output]


@dataclass
class GateResult:
    passed: bool
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reasons(self) -> str:
        bad = [
            f"{k}: {v['message']}"
            if "message" in v
            else f"{k}: {v['value']:.4f} {'<=' if v.get('strict') else '<'} {v['threshold']:.4f}"
            for k, v in self.checks.items()
            if not v["passed"]
        ]
        return "all gates passed" if not bad else "; ".join(bad)

    def fail(self, name: str, message: str) -> None:
        """A check that is not a threshold (the champion cannot be compared; the alias moved meanwhile)."""
        self.checks[name] = {"passed": False, "message": message}
        self.passed = False


def evaluate_gates(
    metrics: dict[str, float],
    gates: GateConfig,
    baseline: float | None,
    champion: float | None,
    champion_blocked: str | None = None,
) -> GateResult:
    """Every gate of the spec; a champion that cannot be compared on these rows (`champion_blocked`
    says why) fails the champion gate rather than being skipped."""
    if gates.metric not in metrics:
        raise KdpipeError(
            f"tracking.gates.metric '{gates.metric}' was not measured; this run measured "
            f"{sorted(k for k in metrics if k.startswith('test_'))}"
        )
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
    result = GateResult(all(c["passed"] for c in checks.values()), checks)
    if champion_blocked:
        result.fail("over_champion", champion_blocked)
    return result


def comparable(champion: Any, id_scheme: str, split: dict[str, Any]) -> str | None:
    """Why the champion cannot be scored on this run's test rows, or None when it can: a split is a
    function of the row id, so the champion never trained on this run's test rows only when both
    made their ids the same way and split them with the same settings."""
    import json

    tags = champion.tags or {}
    theirs_ids, theirs_split = tags.get("kdpipe.id_scheme"), tags.get("kdpipe.split")
    if theirs_ids is None or theirs_split is None:
        return (
            f"champion v{champion.version} records no id scheme or split (registered by an older kdpipe), so "
            "this run's test rows may include rows it trained on; compare by hand and move the alias with "
            "`kdpipe promote --force`"
        )
    mine = json.dumps(split, sort_keys=True)
    if theirs_ids != id_scheme or json.loads(theirs_split) != json.loads(mine):
        return (
            f"champion v{champion.version} was trained with ids '{theirs_ids}' and split {theirs_split}, this run "
            f"with ids '{id_scheme}' and split {mine}: its training rows may be among this run's test rows, so "
            "it is not scored on them (set source.id_column to keep ids stable across formats; promote by hand "
            "with `kdpipe promote --force` after comparing)"
        )
    return None


def log_and_register(
    run_id: str,
    student: nn.Module,
    example: dict[str, np.ndarray],
    model_name: str,
    tags: dict[str, str],
    spec: dict[str, Any],
    columns: list[str] | None = None,
    classes: list[str] | None = None,
) -> Any:
    """Log the student and register a new version. Nothing in it is a pickle: a Hugging Face
    student (one with `hf_model`, `hf_tokenizer()` and `save_hf_extras(dir)`; optional `hf_task`)
    goes through `mlflow.transformers` (safetensors); any other is
    an exported program (`mlflow.pytorch`, pt2, for other tools) plus kdpipe's own flavor —
    safetensors weights and the student spec — which is all kdpipe itself ever loads back. A
    student of a table's named feature `columns` is served by `pyfunc` on a DataFrame of those
    columns instead (`kdpipe.tabular_model`, with the exported program), one output per class
    (`classes`, when the labels were names)."""
    import tempfile
    from pathlib import Path

    import mlflow

    if hasattr(student, "hf_model"):
        return _log_transformers(run_id, student, model_name, tags)
    client = tracking.client()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "student"
        if columns:
            _save_tabular(student, example, path, columns, classes, Path(d))
        else:
            _save_exported(student, example, path)
        _add_kdpipe_flavor(path, student, spec)
        found = pickles_in(path)
        if found:  # a new torch or MLflow started writing pickles: refuse rather than ship them
            raise RuntimeError(f"the model to register holds pickled files {found}; kdpipe registers no pickles")
        client.log_artifacts(run_id, str(path), "student")
    mv = mlflow.register_model(f"runs:/{run_id}/student", model_name, await_registration_for=60)
    for k, v in {**tags, "kdpipe.flavor": KDPIPE_FLAVOR}.items():
        client.set_model_version_tag(model_name, str(mv.version), k, str(v))
    return client.get_model_version(model_name, str(mv.version))


KDPIPE_FLAVOR = "kdpipe"


def _save_exported(student: nn.Module, example: dict[str, np.ndarray], path: Any) -> None:
    """`mlflow.pytorch` pt2 (torch.export) with a dynamic batch (and sequence) dimension, then the
    archive's pickled sample inputs blanked (torch.export.load reads empty ones as none)."""
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    tokens = len(getattr(student, "serving_inputs", ["x"])) > 1
    model = (TokenInputModel(student) if tokens else InferenceModel(student)).eval()
    arrays = [np.array(example[k]) for k in model.inputs]  # writable copies: Ray's batches are read-only views
    with torch.no_grad():
        out = model(*[torch.from_numpy(a) for a in arrays]).numpy()
    shape = (lambda a: (-1,) * a.ndim) if tokens else (lambda a: (-1, *a.shape[1:]))
    names = ["input_ids", "attention_mask"] if tokens else [None]
    signature = ModelSignature(
        Schema([TensorSpec(a.dtype, shape(a), n) for a, n in zip(arrays, names)]),
        Schema([TensorSpec(out.dtype, (-1, *out.shape[1:]))]),
    )
    with warnings.catch_warnings():  # MLflow reads its saved example back read-only; torch warns, harmlessly
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        mlflow.pytorch.save_model(
            model,
            str(path),
            serialization_format="pt2",
            signature=signature,
            input_example=tuple(arrays) if tokens else arrays[0],
            pip_requirements=_requirements("torch", "numpy"),
        )
    _blank_sample_inputs(path / "data" / "model.pt2")


def _save_tabular(
    student: nn.Module,
    example: dict[str, np.ndarray],
    path: Any,
    columns: list[str],
    classes: list[str] | None,
    work: Any,
) -> None:
    """A pyfunc "model from code" (`kdpipe.tabular_model`) over the student's exported program: its
    signature names the feature columns (doubles: a DataFrame of ints or floats passes) and one
    float output per class."""
    from pathlib import Path

    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    model = InferenceModel(student).eval()
    x = np.array(example["x"], dtype=np.float32)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.from_numpy(np.concatenate([x, x])),), dynamic_shapes=({0: batch},))
    pt2 = Path(work) / "model.pt2"
    torch.export.save(program, str(pt2))
    _blank_sample_inputs(pt2)
    with torch.no_grad():
        width = int(model(torch.from_numpy(x)).shape[1])
    outputs = list(classes) if classes and len(classes) == width else [f"logit_{i}" for i in range(width)]
    signature = ModelSignature(
        Schema([ColSpec("double", c) for c in columns]), Schema([ColSpec("float", o) for o in outputs])
    )
    code = Path(__file__).with_name("tabular_model.py")
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(code),
        artifacts={"program": str(pt2)},
        signature=signature,
        input_example=pd.DataFrame(x[:2].astype(np.float64), columns=columns),
        model_config={"outputs": outputs},
        pip_requirements=_requirements("torch", "numpy", "pandas", "mlflow"),
    )


def _blank_sample_inputs(pt2: Any) -> None:
    import os
    import zipfile

    tmp = pt2.with_name(pt2.name + ".tmp")
    with zipfile.ZipFile(pt2) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, b"" if "/data/sample_inputs/" in info.filename else src.read(info))
    os.replace(tmp, pt2)


def _add_kdpipe_flavor(path: Any, student: nn.Module, spec: dict[str, Any]) -> None:
    """The student kind, params and meta + safetensors weights, as a flavor in the MLmodel file."""
    from mlflow.models import Model

    (path / "kdpipe").mkdir()
    save_state(student.state_dict(), path / "kdpipe" / "model.safetensors")
    m = Model.load(str(path / "MLmodel"))
    m.add_flavor(
        KDPIPE_FLAVOR,
        weights="kdpipe/model.safetensors",
        student=spec["kind"],
        params=spec["params"],
        meta=spec["meta"],
        serving_inputs=list(getattr(student, "serving_inputs", ["x"])),
        serving_output=getattr(student, "serving_output", "logits"),
    )
    m.save(str(path / "MLmodel"))


def pickles_in(path: Any) -> list[str]:
    """Files under `path` that hold a pickle: by name, as a non-empty member of a zip archive
    (torch.save and pt2 archives keep theirs as *.pkl / *.pt), or by content (protocol 2-5
    header and STOP opcode; safetensors files are exempt, their header length can look alike)."""
    import zipfile
    from pathlib import Path

    found = []
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        if f.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib"):
            found.append(str(f))
        elif zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                found += [
                    f"{f}!{i.filename}"
                    for i in z.infolist()
                    if i.file_size and i.filename.endswith((".pkl", ".pt", ".pickle"))
                ]
        elif f.suffix != ".safetensors" and f.stat().st_size >= 3:
            with open(f, "rb") as fh:
                head = fh.read(2)
                fh.seek(-1, 2)
                tail = fh.read(1)
            if head[0] == 0x80 and 2 <= head[1] <= 5 and tail == b".":
                found.append(str(f))
    return found


def _log_transformers(run_id: str, student: nn.Module, model_name: str, tags: dict[str, str]) -> Any:
    """A Hugging Face student as an `mlflow.transformers` model of the student's pipeline task
    (`text-generation`, `text-classification`, `feature-extraction`): safetensors weights and
    tokenizer, so `mlflow.transformers.load_model("models:/NAME@ALIAS")` gives a working pipeline.
    MLflow writes the weights into `model/`; the student's `save_hf_extras` then adds what its
    `save_hf` writes beside them (the tokenizer; for encoders the sentence-transformers modules),
    so `AutoModel*.from_pretrained` and `SentenceTransformer` load `<artifact>/model` as it is.
    No pickles."""
    import tempfile
    from pathlib import Path

    import mlflow
    import mlflow.transformers

    task = getattr(student, "hf_task", "text-generation")
    client = tracking.client()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "student"
        mlflow.transformers.save_model(
            {"model": student.hf_model.eval(), "tokenizer": student.hf_tokenizer()},  # type: ignore[attr-defined,operator]
            str(path),
            task=task,
            pip_requirements=_requirements(
                "torch",
                "transformers",
                "tokenizers",
                "safetensors",
                *(["sentence-transformers"] if task == "feature-extraction" else []),
            ),
        )
        student.save_hf_extras(path / "model")  # type: ignore[operator]
        found = pickles_in(path)
        if found:
            raise RuntimeError(f"the model to register holds pickled files {found}; kdpipe registers no pickles")
        client.log_artifacts(run_id, str(path), "student")
    mv = mlflow.register_model(f"runs:/{run_id}/student", model_name, await_registration_for=60)
    for k, v in {**tags, "kdpipe.flavor": "transformers", "kdpipe.hf_task": task}.items():
        client.set_model_version_tag(model_name, str(mv.version), k, str(v))
    return client.get_model_version(model_name, str(mv.version))


def _requirements(*packages: str) -> list[str]:
    """What serving the model needs, pinned to what trained it, without local version labels
    (`torch==2.13.0`, not `+cpu`, which no index serves; MLflow's own inference would also add
    torchvision, which these models do not use)."""
    from importlib.metadata import version

    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(client: Any, name: str, version: str, alias: str) -> None:
    client.set_registered_model_alias(name, alias, str(version))
    log.info("model %s: alias '%s' -> version %s", name, alias, version)


def promote_if_unchanged(client: Any, name: str, version: str, alias: str, expected: str | None) -> str | None:
    """Move `alias` to `version` only if it still points at `expected` (the champion the gates
    compared against; None: no champion). MLflow has no compare-and-set: the alias is re-read just
    before it is set, and cycles of one model are serialised by `kdpipe.cycle_lock`, so only a manual
    `kdpipe promote` can slip between. Returns why it was not moved, or None."""
    current = alias_version(client, name, alias)
    now = str(current.version) if current is not None else None
    if now != (str(expected) if expected is not None else None):
        return (
            f"the alias '{alias}' moved to version {now} while this run compared against "
            f"{'version ' + str(expected) if expected else 'no champion'}; run again to compare with it"
        )
    promote(client, name, version, alias)
    return None


def check_promotable(version: Any, force: bool) -> None:
    """A version whose gates failed is promoted only with `force`."""
    tags = version.tags or {}
    if tags.get("kdpipe.gates_passed") == "False" and not force:
        raise KdpipeError(
            f"{version.name} version {version.version} failed its gates "
            f"({tags.get('kdpipe.gate_reasons') or tags.get('kdpipe.gates', '?')}); pass --force to "
            "promote it anyway"
        )
    if tags.get("kdpipe.cycle_complete") != "true" and tags.get("kdpipe.flavor") and not force:
        raise KdpipeError(
            f"{version.name} version {version.version} comes from a cycle that did not finish; pass "
            "--force to promote it anyway"
        )


class ServedStudent(nn.Module):
    """A registered Hugging Face model behind the student interface, so the champion is
    evaluated by the same evaluator, on the same rows, as the challenger."""

    def __init__(self, model: nn.Module, inputs: list[str], output: str) -> None:
        super().__init__()
        self.model, self.inputs, self.output = model, inputs, output

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.output: self.model(*[batch[k] for k in self.inputs])}


def load_served(version: Any) -> nn.Module:
    """A registered version as a student module, loaded without unpickling anything: safetensors
    weights into an architecture built from kdpipe's own code (never code or pickles that
    whoever can write to the registry put there)."""
    import json
    from pathlib import Path

    import mlflow
    from mlflow.models import Model
    from safetensors.torch import load_file

    tags = version.tags or {}
    uri = f"models:/{version.name}/{version.version}"
    if tags.get("kdpipe.flavor") == "transformers":
        inputs, output = json.loads(tags["kdpipe.serving_inputs"]), tags.get("kdpipe.serving_output", "logits")
        return ServedStudent(load_hf_served(uri, tags.get("kdpipe.hf_task", "text-generation")), inputs, output).eval()
    local = Path(mlflow.artifacts.download_artifacts(uri))
    flavor = Model.load(str(local / "MLmodel")).flavors.get(KDPIPE_FLAVOR)
    if flavor is None:
        raise KdpipeError(
            f"model {version.name} version {version.version} has no '{KDPIPE_FLAVOR}' flavor (an older "
            "kdpipe registered it as a pickle, which kdpipe does not load); register a new version with "
            f"`kdpipe run`, or move the alias off it: `mlflow` client.delete_registered_model_alias"
        )
    student = build_student(flavor["student"], flavor["params"], StudentMeta(**flavor["meta"]))
    student.load_state_dict(load_file(str(local / flavor["weights"])))
    return student.eval()


def load_hf_served(uri: str, task: str) -> nn.Module:
    """A registered Hugging Face model as (input_ids, attention_mask) -> its served output: logits
    for generation and classification, the sentence embedding (the sentence-transformers modules
    saved beside the weights: pooling, dense, normalisation) for feature extraction."""
    import mlflow

    if task == "feature-extraction":
        from pathlib import Path

        from sentence_transformers import SentenceTransformer

        local = Path(mlflow.artifacts.download_artifacts(uri)) / "model"
        return SentenceEmbedding(SentenceTransformer(str(local), device="cpu", local_files_only=True))
    import mlflow.transformers

    return HFLogits(mlflow.transformers.load_model(uri, return_type="components")["model"].eval())


class HFLogits(nn.Module):
    """A loaded Hugging Face causal LM or sequence classifier as (input_ids, attention_mask) ->
    logits, the serving signature the champion is re-scored through."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.extra = {"use_cache": False} if model.can_generate() else {}  # type: ignore[operator]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.long(), attention_mask=attention_mask.long(), **self.extra).logits


class SentenceEmbedding(nn.Module):
    """A sentence-transformers model as (input_ids, attention_mask) -> sentence embedding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids.long(), "attention_mask": attention_mask.long()})[
            "sentence_embedding"
        ]


class RegisteredFactory:
    """Loads a registered version where it is called (an evaluation actor): only the tracking
    URI, name and version cross the Ray boundary, never the model object."""

    def __init__(self, tracking_uri: str, name: str, version: str) -> None:
        self.uri, self.name, self.version = tracking_uri, name, version

    def __call__(self) -> nn.Module:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        return load_served(tracking.client(self.uri).get_model_version(self.name, self.version))


def log_exit_models(client: Any, run_id: str, student: nn.Module) -> list[str]:
    """Every early exit of a multi-exit Hugging Face student as its own truncated model directory
    (`save_hf(dir, depth=d)`, loadable with `from_pretrained`) under the run's `exits/depth_<d>`:
    the family of smaller models one hierarchical self-distillation run yields."""
    import tempfile
    from pathlib import Path

    paths = []
    for depth in student.exit_depths:  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory() as d:
            student.save_hf(Path(d) / "m", depth=depth)  # type: ignore[operator]
            client.log_artifacts(run_id, str(Path(d) / "m"), f"exits/depth_{depth}")
        paths.append(f"exits/depth_{depth}")
    return paths


STATE_ARTIFACT = "student_state/model.safetensors"


def log_student_state(client: Any, run_id: str, state: dict[str, torch.Tensor]) -> None:
    """The raw student weights beside the served model: what a warm-started retrain loads."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_state(state, path)
        client.log_artifact(run_id, str(path), "student_state")


def save_state(state: dict[str, torch.Tensor], path: Any) -> None:
    """A state dict as safetensors; tied weights (one storage, two names) get their own copies,
    which safetensors requires."""
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))


def load_student_state(client: Any, run_id: str) -> dict[str, torch.Tensor]:
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        return load_file(client.download_artifacts(run_id, STATE_ARTIFACT, d))

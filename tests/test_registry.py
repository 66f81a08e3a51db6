"""The registry holds no pickles: what kdpipe registers loads back (in kdpipe, through
`mlflow.pytorch`) from safetensors and an exported program, and a pickle in it is caught.
(Hugging Face students go through `mlflow.transformers`: tests/test_hf_students.py.)"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe import model_registry as reg
from kdpipe.train import StudentMeta, build_student


def test_the_scanner_finds_pickles_in_every_disguise(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(clean / "model.safetensors"))
    (clean / "MLmodel").write_text("flavors: {}\n")
    assert reg.pickles_in(clean) == []

    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.ckpt")  # a zip archive holding data.pkl
    (tmp_path / "blob").write_bytes(__import__("pickle").dumps({"a": 1}))  # a bare pickle, no suffix
    with zipfile.ZipFile(tmp_path / "model.pt2", "w") as z:  # an archive with a pickled member
        z.writestr("m/data/sample_inputs/model.pt", b"PK...")
    found = reg.pickles_in(tmp_path)
    assert any(f.endswith("weights.ckpt") for f in found) and any(f.endswith("blob") for f in found)
    assert any("model.pt2!m/data/sample_inputs/model.pt" in f for f in found)


def _student():
    meta = StudentMeta(in_dim=64, num_classes=10, teachers=["t"], widths={})
    params = {"hidden": [32]}
    example = {"x": np.random.default_rng(0).random((4, 64), dtype=np.float32)}
    torch.manual_seed(0)
    return build_student("mlp", params, meta).eval(), params, meta, example


def test_registered_student_has_no_pickle_and_loads_back_exactly(tmp_path: Path) -> None:
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    student, params, meta, example = _student()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = MlflowClient().create_experiment("reg", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    spec = {"kind": "mlp", "params": params, "meta": meta.as_dict()}
    mv = reg.log_and_register(run.info.run_id, student, example, "m", {"kdpipe.run_id": run.info.run_id}, spec)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/m/{mv.version}", dst_path=str(tmp_path / "dl")))
    assert reg.pickles_in(local) == [] and (local / "kdpipe" / "model.safetensors").exists()

    batch = {k: torch.from_numpy(v) for k, v in example.items()}
    with torch.no_grad():
        want = student(batch)["logits"]
        got = reg.load_served(mv)(batch)["logits"]
        served = mlflow.pytorch.load_model(f"models:/m/{mv.version}")  # the exported program, for other tools
        by_pt2 = served(batch["x"])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(by_pt2, want, rtol=1e-4, atol=1e-5)


def test_a_version_without_the_kdpipe_flavor_is_refused_not_unpickled(tmp_path: Path) -> None:
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from kdpipe.config import KdpipeError

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = MlflowClient().create_experiment("old", artifact_location=(tmp_path / "mlartifacts").as_uri())
    student, *_ = _student()
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pytorch.log_model(
            reg.InferenceModel(student), name="student", serialization_format="pickle", registered_model_name="old"
        )
    mv = MlflowClient().get_model_version("old", str(info.registered_model_version))
    with pytest.raises(KdpipeError, match="no 'kdpipe' flavor"):
        reg.load_served(mv)
    import shutil

    shutil.rmtree(tmp_path / "mlartifacts")  # the one pickle made on purpose; the suite-wide scan finds any other


class _TokenBag(torch.nn.Module):
    """A student that is not a Hugging Face model but serves on (input_ids, attention_mask)."""

    serving_inputs = ["t.input_ids", "t.attention_mask"]
    serving_output = "embedding"

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(3000, 8)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = batch["t.attention_mask"].float()[..., None]
        return {"embedding": (self.emb(batch["t.input_ids"].long()) * m).sum(1) / m.sum(1).clamp(min=1)}


def test_a_token_student_exports_with_dynamic_batch_and_length(tmp_path: Path) -> None:
    """Custom token students go through the exported program too: two named inputs, the batch and
    the sequence length dynamic, no pickle."""
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    torch.manual_seed(0)
    student = _TokenBag().eval()
    rng = np.random.default_rng(0)
    example = {"t.input_ids": rng.integers(0, 3000, (4, 12)), "t.attention_mask": np.ones((4, 12), np.int64)}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = MlflowClient().create_experiment("tok", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    mv = reg.log_and_register(
        run.info.run_id, student, example, "tok", {}, {"kind": "custom", "params": {}, "meta": {}}
    )
    assert reg.pickles_in(tmp_path / "mlartifacts") == []
    served = mlflow.pytorch.load_model(f"models:/tok/{mv.version}")
    ids, mask = torch.randint(0, 3000, (3, 7)), torch.ones(3, 7, dtype=torch.int64)  # other batch and length
    mask[0, 4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            served(ids, mask), student({"t.input_ids": ids, "t.attention_mask": mask})["embedding"]
        )

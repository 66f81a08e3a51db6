"""Shared fixtures: one real local Ray for the session, specs that write only under tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the session's embedded Ray on loopback, as kdpipe's


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from kdpipe.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def no_pickles_registered(tmp_path_factory):
    """After the session: every model that any test logged (an MLmodel anywhere under the
    session's tmp dirs: sqlite stores' mlartifacts, `mlflow server` artifact roots) is scanned,
    and one holding a pickle fails the run (issue 14: the registry must not run code on load)."""
    yield
    from kdpipe.model_registry import pickles_in

    root = tmp_path_factory.getbasetemp()
    found = [p for m in root.rglob("MLmodel") for p in pickles_in(m.parent)]
    assert found == [], f"registered models hold pickles: {found}"


def tiny_overrides(tmp: Path, **extra: Any) -> dict[str, Any]:
    """Small, fast settings for pipelines/digits_kd.yaml, every output under `tmp`. One training
    worker: a worker process costs seconds to start on 2 cores; the tests of data-parallel training
    (the demo's two workers, each rank's share) ask for two."""
    o = {
        "storage": str(tmp),
        "teachers.0.params.epochs": 40,
        "teachers.0.params.hidden": [128],
        "train.epochs": 4,
        "train.num_workers": 1,
        "train.checkpoint_every": 2,
        "evaluate.baseline_epochs": 2,
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
    }
    o.update(extra)
    return o


@pytest.fixture
def digits_spec_raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "pipelines" / "digits_kd.yaml").read_text())

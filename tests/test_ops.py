"""Operating kdpipe against a real `mlflow server`: retraining cycles with incremental caches,
gated promotion in both directions, lineage tags, promote/models/eval, the cron schedule path."""

from __future__ import annotations

import json
import logging
from datetime import UTC
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from kdpipe.arrays import to_fixed_list
from kdpipe.config import load_spec
from kdpipe.ops import build_scheduler, list_models, retrain
from tests.conftest import tiny_overrides
from tests.servers import MlflowServer

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def _write_digits(path: Path, lo: int, hi: int, nan_rows: int = 0) -> None:
    """Real digits rows [lo, hi) as one Parquet file of a growing source directory
    (the first `nan_rows` of them corrupted with a NaN, as bad input)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[lo:hi] / 16.0).astype(np.float32)
    x[:nan_rows, 3] = np.nan
    pq.write_table(pa.table({"x": to_fixed_list(x), "label": pa.array(d.target[lo:hi].astype(np.int64))}), path)


def _overrides(tmp: Path, uri: str, **extra):
    o = tiny_overrides(
        tmp,
        **{
            "source": {
                "kind": "parquet",
                "path": str(tmp / "data"),
                "features": "x",
                "label": "label",
                "num_classes": 10,
                "on_bad_rows": "skip",
                "split": {"val": 0.15, "test": 0.25, "labeled_fraction": 0.3},
            },
            "tracking.tracking_uri": uri,
            "tracking.model_name": "retrain-student",
            "tracking.gates.min_gain_over_baseline": None,
            "evaluate.baseline": False,
        },
    )
    o.update(extra)
    return o


def _spec(tmp: Path, uri: str, **extra):
    return load_spec("pipelines/digits_kd.yaml", _overrides(tmp, uri, **extra))


def test_retrain_cycles_incremental_cache_and_gates(ray_local, mlflow_server, tmp_path: Path, capsys, caplog) -> None:
    (tmp_path / "data").mkdir()
    _write_digits(tmp_path / "data" / "part-a.parquet", 0, 1001, nan_rows=1)
    uri = mlflow_server.uri
    client = MlflowClient(uri)

    # cycle 1: a weak student (1 epoch), promoted because there is no champion yet
    c1 = retrain(_spec(tmp_path, uri, **{"train.epochs": 1}))
    assert not c1.skipped and c1.run.promoted
    t1 = c1.run.teach["digits_mlp"]
    assert t1.rows_taught == 1000  # the NaN row was quarantined, counted in MLflow, never taught
    assert client.get_run(c1.run.run_id).data.metrics["rows_bad_skipped"] == 1
    assert [a.path for a in client.list_artifacts(c1.run.run_id, "quarantine")]

    # nothing new: the cycle is a no-op (idempotent); run as the scheduler runs it, from its job
    job = build_scheduler("pipelines/digits_kd.yaml", "0 3 * * *", _overrides(tmp_path, uri)).get_jobs()[0]
    with caplog.at_level(logging.INFO, logger="kdpipe.ops"):
        job.func()
    assert any("no new source data" in m for m in caplog.messages), caplog.messages
    assert len(client.search_model_versions("name='retrain-student'")) == 1

    # cycle 2: new rows arrive; only they hit the teacher; a better student wins against the re-scored champion
    _write_digits(tmp_path / "data" / "part-b.parquet", 1001, 1797)
    c2 = retrain(_spec(tmp_path, uri, **{"train.epochs": 8}))
    t2 = c2.run.teach["digits_mlp"]
    assert t2.fingerprint == t1.fingerprint and t2.rows_taught == 796
    parts = t2.manifest()["parts"]
    assert [p["rows"] for p in parts] == [1000, 796] and parts[0]["source_fingerprint"] != parts[1][
        "source_fingerprint"
    ]
    assert c2.run.metrics["champion_version"] == 1.0
    assert c2.run.promoted, c2.run.gate_reasons
    assert client.get_model_version_by_alias("retrain-student", "champion").version == c2.run.model_version

    # a warm-started challenger with a learning rate too small to move its weights *is* the
    # champion (a fresh init would be far from it): it ties on the re-scored test rows, is
    # registered, and a tie keeps the alias where it is
    from kdpipe.model_registry import load_student_state

    c3 = retrain(_spec(tmp_path, uri, **{"train.epochs": 1, "train.lr": 1e-12}), force=True, warm_start=True)
    champ, warm = load_student_state(client, c2.run.run_id), load_student_state(client, c3.run.run_id)
    assert champ.keys() == warm.keys()
    assert max(float((champ[k] - warm[k]).abs().max()) for k in champ) < 1e-6
    assert c3.run.metrics["test_acc"] == c3.run.metrics["champion_test_acc"]
    assert not c3.skipped and not c3.run.promoted and "over_champion" in c3.run.gate_reasons
    mv3 = client.get_model_version("retrain-student", c3.run.model_version)
    assert mv3.tags["kdpipe.gates_passed"] == "False"
    assert client.get_model_version_by_alias("retrain-student", "champion").version == c2.run.model_version

    # lineage on every version
    for tag in (
        "kdpipe.cache.digits_mlp",
        "kdpipe.source_fingerprint",
        "kdpipe.spec_hash",
        "kdpipe.git_commit",
        "kdpipe.teachers",
        "kdpipe.gates",
    ):
        assert mv3.tags.get(tag), tag

    # `kdpipe models` lists versions with aliases; `kdpipe promote` moves the alias; `kdpipe eval` scores it
    listing = list_models("retrain-student", uri)
    assert "champion" in listing and len(listing.splitlines()) == 4
    from kdpipe.cli import main

    # v3 failed its gates: `promote` refuses it without a word of force, and says so; --force moves the alias
    capsys.readouterr()
    assert main(["promote", "retrain-student", c3.run.model_version, "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "failed its gates" in err and "over_champion" in err and "--force" in err
    assert client.get_model_version_by_alias("retrain-student", "champion").version == c2.run.model_version
    assert main(["promote", "retrain-student", c3.run.model_version, "--tracking-uri", uri, "--force"]) == 0
    assert "forced" in capsys.readouterr().out
    assert client.get_model_version_by_alias("retrain-student", "champion").version == c3.run.model_version
    # `kdpipe eval` (evaluate_registered) scores the champion: same rows, same model, same number;
    # then every command's exit code and message
    sets = [a for k, v in _overrides(tmp_path, uri).items() for a in ("--set", f"{k}={json.dumps(v)}")]
    capsys.readouterr()
    assert main(["eval", "pipelines/digits_kd.yaml", *sets]) == 0
    out = capsys.readouterr().out
    assert "version 3" in out and f"test_acc: {c3.run.metrics['test_acc']:.4f}" in out
    assert main(["eval", "pipelines/digits_kd.yaml", *sets, "--alias", "nope"]) == 1
    assert "has no alias 'nope'" in capsys.readouterr().err
    assert main(["models", "retrain-student", "--tracking-uri", uri]) == 0
    assert "champion" in capsys.readouterr().out
    assert main(["models", "no-such-model", "--tracking-uri", uri]) == 1
    assert "no-such-model" in capsys.readouterr().err
    assert main(["promote", "retrain-student", "99", "--tracking-uri", uri]) == 1
    assert main(["retrain", "pipelines/digits_kd.yaml", *sets]) == 0  # nothing new: a no-op, not a failure
    assert "no new source data" in capsys.readouterr().out


def test_unreachable_tracking_server_fails_before_compute(tmp_path: Path, monkeypatch) -> None:
    """The tracking check comes first: no source row is read and Ray never starts."""
    import kdpipe.pipeline as pipeline
    from kdpipe.tracking import TrackingUnavailableError
    from tests.servers import free_port

    calls: list[str] = []
    from types import SimpleNamespace

    monkeypatch.setattr(
        pipeline,
        "load_source",
        lambda *a, **k: (
            calls.append("load_source")
            or SimpleNamespace(bad_rows=0, split_rows={}, labeled_rows={}, num_rows=0, describe_rows=lambda: "")
        ),
    )
    monkeypatch.setattr(pipeline, "check_storage", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "init_ray", lambda *a, **k: calls.append("init_ray"))
    cfg = load_spec(
        "pipelines/digits_kd.yaml",
        tiny_overrides(tmp_path, **{"tracking.tracking_uri": f"http://127.0.0.1:{free_port()}"}),
    )
    with pytest.raises(TrackingUnavailableError, match="unreachable"):
        pipeline.prepare(cfg)
    assert calls == []
    ok = load_spec("pipelines/digits_kd.yaml", tiny_overrides(tmp_path))  # the spies do see a reachable run
    pipeline.prepare(ok)
    assert calls == ["load_source", "init_ray"]


def test_a_half_finished_cycle_is_not_the_last_cycle_and_its_run_fails(tmp_path: Path) -> None:
    """A crash between registering a version and tagging it `kdpipe.cycle_complete`: the next
    retrain compares against the last complete version, and the MLflow run ends FAILED."""
    from kdpipe.ops import last_complete_version
    from kdpipe.tracking import TrackedRun

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    assert last_complete_version(client, "m") is None  # no model yet
    client.create_registered_model("m")
    for fp, complete in (("fp-a", True), ("fp-b", False)):
        v = client.create_model_version("m", f"file://{tmp_path}/{fp}", tags={"kdpipe.source_fingerprint": fp})
        if complete:
            client.set_model_version_tag("m", v.version, "kdpipe.cycle_complete", "true")
    latest = last_complete_version(client, "m")
    assert str(latest.version) == "1" and latest.tags["kdpipe.source_fingerprint"] == "fp-a"

    with pytest.raises(RuntimeError, match="crash after registering"):
        with TrackedRun(uri, "exp", "cycle", {}) as run:
            raise RuntimeError("crash after registering")
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_schedule_uses_cron_trigger(tmp_path: Path) -> None:
    from datetime import datetime

    sched = build_scheduler("pipelines/digits_kd.yaml", "0 3 * * *")
    job = sched.get_jobs()[0]
    now = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
    fire = job.trigger.get_next_fire_time(None, now)
    assert (fire.hour, fire.minute, fire.day) == (3, 0, 26)
    fire2 = (
        build_scheduler("pipelines/digits_kd.yaml", "*/15 * * * *").get_jobs()[0].trigger.get_next_fire_time(None, now)
    )
    assert (fire2.hour, fire2.minute) == (7, 0) or (fire2.hour, fire2.minute) == (7, 15)
    with pytest.raises(ValueError, match="5-field crontab"):
        build_scheduler("pipelines/digits_kd.yaml", "every night")

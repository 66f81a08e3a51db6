"""Failures on real Ray and MLflow: crashed teacher actor, crashed training worker, MLflow outages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdpipe.config import load_spec
from tests.conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.timeout(900)


def test_teacher_actor_killed_mid_stage_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """A teacher actor process is SIGKILLed from outside once the stage has written output files;
    Ray Data restarts the actor and retries its batches; the published cache has every source row
    exactly once (`todo.check_staged` would refuse a duplicate). Four rows per batch keep the stage
    running for about a hundred small blocks, long enough to kill an actor mid-stage. Own Ray in a
    subprocess."""
    script = textwrap.dedent("""
        import json, os, sys, threading, time
        import psutil
        from kdpipe.config import load_spec
        from kdpipe.pipeline import prepare, teach
        cfg = load_spec("pipelines/digits_kd.yaml", json.loads(sys.argv[1]))
        killed, staged = [], []

        def staged_files():
            return [f for d, _, fs in os.walk(os.path.join(cfg.storage, "cache")) if "/.staging/" in d + "/" for f in fs
                    if f.endswith(".parquet")]

        def kill_a_teacher_once_output_is_written():
            deadline = time.time() + 300
            while time.time() < deadline and not killed:
                files = staged_files()
                if files:
                    for p in psutil.process_iter(["cmdline"]):
                        cmd = " ".join(p.info["cmdline"] or [])
                        if cmd.startswith("ray::") and "TeacherActor" in cmd:  # an actor's process title
                            staged.append(len(files))
                            p.kill()
                            killed.append(p.pid)
                            return
                time.sleep(0.05)

        source, _ = prepare(cfg)
        threading.Thread(target=kill_a_teacher_once_output_is_written, daemon=True).start()
        r = teach(cfg, source)["digits_mlp"]
        ids = r.cache.read(columns=None)["id"].to_pylist()
        print(json.dumps({"rows": len(ids), "unique": len(set(ids)), "source": source.table.num_rows,
                          "same": sorted(ids) == sorted(source.table["id"].to_pylist()), "killed": killed,
                          "staged_before_kill": staged, "parts": len(r.manifest()["parts"])}))
    """)
    o = tiny_overrides(tmp_path, **{"teach.batch_size": 4, "teach.concurrency": 2, "teach.num_cpus": 0.5})
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(o)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert len(res["killed"]) == 1 and res["staged_before_kill"][0] >= 1, res  # killed after output was written
    assert res["rows"] == res["unique"] == res["source"] and res["same"] and res["parts"] == 1, res


@pytest.mark.slow  # two Ray Train start-ups (~95 s): `make test-all`; the teacher-crash test above stays in the default suite
def test_training_worker_killed_resumes_from_checkpoint_in_one_mlflow_run(ray_local, tmp_path: Path, caplog) -> None:
    """A Ray Train worker is SIGKILLed from outside once epoch 4 is in MLflow; the worker group
    restarts from the last checkpoint, in the same MLflow run: the run says so (tags, a console
    line), and every epoch appears once in the metric history (the replayed ones are not logged
    again)."""
    import logging
    import threading
    import time

    import psutil

    from kdpipe.pipeline import distil, prepare, teach

    o = tiny_overrides(
        tmp_path,
        **{
            "train.epochs": 8,
            "train.checkpoint_every": 2,
            "train.max_failures": 1,
            "evaluate.baseline": False,
            "source.limit": 600,
        },
    )
    cfg = load_spec("pipelines/digits_kd.yaml", o)
    source, uri = prepare(cfg)
    taught = teach(cfg, source)
    client = MlflowClient(uri)
    killed: list[int] = []

    def kill_a_worker_after_epoch_4() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            runs = (
                client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
                if client.get_experiment_by_name(cfg.tracking.experiment)
                else []
            )
            if runs and any(m.step >= 4 for m in client.get_metric_history(runs[0].info.run_id, "val_acc")):
                for p in psutil.process_iter(["cmdline"]):
                    if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                        p.kill()
                        killed.append(p.pid)
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker_after_epoch_4, daemon=True)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        res = distil(cfg, source, taught, uri)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == res.run_id and runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(res.run_id, "val_acc"))
    assert steps == list(range(8)), steps  # each epoch once: the replayed ones were not logged again
    tags = client.get_run(res.run_id).data.tags
    assert tags["kdpipe.train.restarts"] == "1" and "after epoch" in tags["kdpipe.train.resumed_from"]
    import re

    after = int(re.search(r"after epoch (\d+)", tags["kdpipe.train.resumed_from"]).group(1))
    assert after in (1, 3), tags  # from a checkpoint (after epoch 1 or 3), not from scratch
    assert "training restarted 1 time(s)" in caplog.text
    assert res.model_version == "1"


def test_metrics_logger_survives_mlflow_outage(tmp_path: Path, monkeypatch) -> None:
    from kdpipe.tracking import MetricsLogger
    from tests.servers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = MetricsLogger(f"http://127.0.0.1:{free_port()}", run_id="0" * 32)
    dead.log({"loss": 1.0, "epoch": 0}, step=0)  # must not raise: training continues
    dead.log({"loss": 0.5, "epoch": 1}, step=1)
    assert dead.failures == 2 and len(dead.buffer) == 2

    # when tracking comes back, buffered metrics are delivered in order
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"))
    dead.client, dead.run_id = client, run.info.run_id
    dead.flush()
    assert dead.buffer == [] and [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5]


@pytest.mark.slow  # one full `kdpipe run` (~2 min): `make test-all`
def test_mlflow_server_killed_mid_training_then_back_loses_no_metric(tmp_path: Path) -> None:
    """A real `mlflow server` is SIGKILLed while `kdpipe run` trains and restarted a few epochs
    later: training never waits on it, the run finishes as one FINISHED run with every epoch's
    metrics (buffered on rank 0, flushed when the server is back), and the student is registered."""
    from tests.servers import BIN, MlflowServer

    server = MlflowServer(tmp_path / "mlflow")
    try:
        o = tiny_overrides(
            tmp_path,
            **{
                "tracking.tracking_uri": server.uri,
                "train.epochs": 40,
                "train.checkpoint_every": 10,
                "evaluate.baseline": False,
            },
        )
        sets = [a for k, v in o.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        run = subprocess.Popen(
            [str(BIN / "kdpipe"), "run", "pipelines/digits_kd.yaml", *sets],
            cwd=ROOT,
            env={**os.environ, "RAY_ADDRESS": ""},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        client = MlflowClient(server.uri)
        deadline = time.time() + 600
        while time.time() < deadline and run.poll() is None:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and len(client.get_metric_history(runs[0].info.run_id, "val_acc")) >= 3:
                break
            time.sleep(0.5)
        assert run.poll() is None, run.stdout.read()[-3000:]
        server.kill()
        time.sleep(8)  # several epochs (~0.5 s each) with no tracking server
        assert run.poll() is None, "the run should still be training"
        server.start()
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-3000:]
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        rid = runs[0].info.run_id
        assert [m.step for m in client.get_metric_history(rid, "val_acc")] == list(range(40))
        assert "MLflow was unreachable from the training workers" in out  # seen and reported, not hidden
        assert client.get_model_version("digits-student", "1").run_id == rid
    finally:
        server.stop()


def test_weights_are_never_unpickled() -> None:
    """Every torch.load in the product passes weights_only=True, no loader that unpickles is called
    (registered models load through load_served); trust_remote_code defaults off. The one file
    exempt is the pyfunc MLflow copies into a table's registered model (`kdpipe/tabular_model.py`):
    it runs in the process of whoever serves the model, as `mlflow.pytorch.load_model` would, and
    kdpipe never calls it."""
    from kdpipe.config import TeacherConfig

    offenders = []
    served = ROOT / "kdpipe" / "tabular_model.py"
    for path in (
        list((ROOT / "kdpipe").rglob("*.py"))
        + list((ROOT / "teachers").rglob("*.py"))
        + list((ROOT / "students").rglob("*.py"))
    ):
        if path == served:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path}:{n}")
            if any(
                call in line for call in ("pytorch.load_model(", "torch.export.load(", "pickle.load", "cloudpickle")
            ):
                offenders.append(f"{path}:{n}")  # loaders that unpickle (pt2 falls back to weights_only=False)
    assert offenders == []
    assert TeacherConfig.model_fields["trust_remote_code"].default is False


def test_missing_teacher_weights_name_the_fix(tmp_path: Path) -> None:
    from kdpipe.config import TeacherConfig
    from teachers import TEACHERS

    t = TeacherConfig(id="t", kind="mlp_classifier", path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="kdpipe teach"):
        TEACHERS.get("mlp_classifier").load(t)


def test_exactly_once_check_catches_missing_and_repeated_rows(tmp_path: Path) -> None:
    """The check that guards every cache part: a dropped row, a repeated row, and a swap of one
    for a repeat (same count) are each refused before anything is published."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdpipe.todo import IdTally, check_staged

    todo = pa.array([f"id{i}" for i in range(10)])
    want = IdTally.of(todo)

    def staged(*parts: list[str]) -> Path:
        d = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for i, p in enumerate(parts):
            pq.write_table(pa.table({"id": pa.array(p, pa.string())}), d / f"part-{i}.parquet")
        return d

    ids = todo.to_pylist()
    check_staged(staged(ids[:4], ids[4:]), want)  # all rows once, across files: fine
    with pytest.raises(RuntimeError, match="returned 9 rows"):
        check_staged(staged(ids[:4], ids[5:]), want)
    with pytest.raises(RuntimeError, match="duplicate rows"):
        check_staged(staged(ids, ids[:1]), want)
    with pytest.raises(RuntimeError, match="not the 10 requested"):
        check_staged(staged(ids[:9], ids[:1]), want)


def test_source_file_edited_between_index_and_teach_is_refused(ray_local, tmp_path: Path) -> None:
    """The teacher actors read rows by position; if the file changed after indexing they stop
    with an error naming the file, and nothing is published."""
    from kdpipe.config import parse_spec
    from kdpipe.data import SourceChangedError, load_source
    from kdpipe.teach import teach_one

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"x": [float(i), 1.0, 2.0], "y": i % 3}) + "\n" for i in range(40)))
    raw = {
        "name": "edit",
        "source": {"kind": "jsonl", "path": str(data), "features": "x", "label": "y", "num_classes": 3},
        "teachers": [
            {
                "id": "t",
                "kind": "mlp_classifier",
                "path": str(tmp_path / "t"),
                "params": {"hidden": [8], "epochs": 1, "train_on": "all_train"},
            }
        ],
        "storage": str(tmp_path),
        "teach": {"num_cpus": 0.5},
        "student": {"kind": "mlp"},
        "losses": [{"name": "ce"}],
        "tracking": {"model_name": "m"},
    }
    cfg = parse_spec(raw)
    src = load_source(cfg.source, tmp_path / "q")
    _ = src.table  # the teacher trains on the rows as indexed; the actors read the file afterwards
    st = os.stat(data)
    data.write_text("".join(json.dumps({"x": [float(i), 9.0, 9.0], "y": i % 3}) + "\n" for i in range(40)))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the ids can tell
    with pytest.raises(SourceChangedError, match=str(data)):
        teach_one(cfg, cfg.teachers[0], src)
    assert not list((tmp_path / "cache").rglob("MANIFEST.json"))

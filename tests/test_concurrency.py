"""Two operators at once: retrain cycles of one model are single-flight, through the real MLflow
stores (a sqlite file and a `mlflow server`), and the alias never moves past a champion the
cycle did not beat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdpipe.cycle_lock import CycleLock, lock_name
from kdpipe.model_registry import promote_if_unchanged
from tests.servers import MlflowServer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow-lock"))
    yield s
    s.stop()


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlruns.db'}"
    return request.getfixturevalue("server").uri


def test_one_holder_at_a_time_and_a_dead_holder_expires(store: str) -> None:
    a, b = CycleLock(MlflowClient(store), "m", lease_s=2), CycleLock(MlflowClient(store), "m", lease_s=2)
    assert a.acquire() and a.held
    assert not b.acquire() and b.holder == a.me  # the second cycle is told who holds it
    a.release()
    assert b.acquire()  # released: free again
    b._stop.set()  # b "dies" (on another host, say): no heartbeat extends its lease
    c = CycleLock(MlflowClient(store), "m", lease_s=2)
    assert not c.acquire()
    time.sleep(2.5)
    assert c.acquire() and c.held  # the lease ran out: taken over
    assert not b.still_held()  # and the old holder knows it is no longer the holder
    c.release()
    assert MlflowClient(store).search_registered_models(f"name = '{lock_name('m')}'") == []


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(store: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
from mlflow.tracking import MlflowClient
from kdpipe.cycle_lock import CycleLock
lock = CycleLock(MlflowClient({store!r}), "m2", lease_s=3600)
assert lock.acquire()
import os; os._exit(0)  # dies holding it
""",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lock = CycleLock(MlflowClient(store), "m2", lease_s=3600)
    assert lock.acquire(), lock.holder  # same host, pid gone: no hour-long wait
    lock.release()


def test_the_alias_moves_only_from_the_champion_the_cycle_compared_against(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("cas")
    for _ in range(3):
        client.create_model_version("cas", "file:///nowhere", run_id=None)
    assert promote_if_unchanged(client, "cas", "1", "champion", expected=None) is None
    # a cycle read v1 as champion, another moved the alias to v2 meanwhile: v3 does not take it
    client.set_registered_model_alias("cas", "champion", "2")
    why = promote_if_unchanged(client, "cas", "3", "champion", expected="1")
    assert why and "moved to version 2" in why
    assert str(client.get_model_version_by_alias("cas", "champion").version) == "2"


def _retrain(tmp_path: Path, uri: str, overrides: dict) -> subprocess.Popen:
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")},
        "MLFLOW_TRACKING_URI": uri,
    }  # as a user's shell has it: kdpipe itself keeps its Ray on loopback
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("kdpipe")), "retrain", "pipelines/digits_kd.yaml", *sets],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_retrain_cycles_started_together_register_one_version_and_move_the_alias_once(
    server, tmp_path: Path
) -> None:
    """A manual `kdpipe retrain` beside the scheduler's, on new data, through a real tracking
    server: one cycle trains and registers; the other says the lock is held and exits 0. Both
    are plain local runs, each with its embedded Ray: watched while they run, nothing of theirs
    listens beyond loopback (but PyTorch's c10d store of Ray Train's rank 0, see ListenWatch)."""
    import threading

    from tests.servers import ListenWatch
    from tests.test_ops import _overrides, _write_digits

    (tmp_path / "data").mkdir()
    _write_digits(tmp_path / "data" / "a.parquet", 0, 1797)
    o = _overrides(tmp_path, server.uri, **{"tracking.model_name": "concurrent", "train.epochs": 2})
    procs = [_retrain(tmp_path, server.uri, o) for _ in range(2)]
    watch, done = ListenWatch(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            for p in procs:
                watch.sample(p.pid)
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outs = [p.communicate(timeout=600)[0] for p in procs]
    done.set()
    sampler.join(timeout=10)
    assert len(watch.seen) >= 5, watch.seen  # Ray's processes were watched while they listened
    assert watch.wide() == [], watch.wide()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    client = MlflowClient(server.uri)
    versions = client.search_model_versions("name='concurrent'")
    assert len(versions) == 1, [v.version for v in versions]
    skipped = [o for o in outs if "retrain: skipped:" in o]
    assert len(skipped) == 1 and ("lock held by" in skipped[0] or "no new source data" in skipped[0]), skipped
    assert str(client.get_model_version_by_alias("concurrent", "champion").version) == str(versions[0].version)
    assert client.search_registered_models("name = 'concurrent.lock'") == []  # released

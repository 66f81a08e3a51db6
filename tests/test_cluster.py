"""`kdpipe submit` to a 2-node Ray cluster that behaves like a real one, as the README's cluster
section says to: each node has its own temp and job directories and its own node cache (and,
where the machine allows it, its own view of the disk), the storage root is a bucket of a real
S3 server every node reaches, the tracking server is a real `mlflow server`.

Submitted twice, the default pipeline succeeds both times wherever its actors land, and the second
submission teaches nothing: the caches and the trained teacher live in the bucket, not in a job
folder. A storage root inside the job folder, or on one node's disk only, is refused before
anything is taught; a tracking URI only this machine can write is refused before anything is sent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.servers import BIN, MlflowServer, RayCluster, S3Server
from tests.test_lm_models import TINY

pytestmark = pytest.mark.timeout(900)

QUICK = {
    "teachers.0.params.epochs": 40,
    "teachers.0.params.hidden": [128],
    "train.epochs": 3,
    "train.num_workers": 1,
    "train.checkpoint_every": 3,
    "evaluate.baseline": False,
    "tracking.gates.min_gain_over_baseline": None,
}


def submit(dashboard: str, env: dict[str, str], *sets: str) -> subprocess.CompletedProcess:
    """`kdpipe submit pipelines/digits_kd.yaml --address DASHBOARD --set ...`, run as a user runs it."""
    args = [a for o in sets for a in ("--set", o)] + [
        a for k, v in QUICK.items() for a in ("--set", f"{k}={json.dumps(v)}")
    ]
    return subprocess.run(
        [str(BIN / "kdpipe"), "submit", "pipelines/digits_kd.yaml", "--address", dashboard, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    s3 = S3Server(root / "s3")
    mlflow = MlflowServer(root / "mlflow")
    cluster = RayCluster(root / "ray")
    # the README's cluster section: the tracking server and the bucket's credentials in the environment
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
        **s3.env,
        "MLFLOW_TRACKING_URI": mlflow.uri,
    }
    yield cluster, s3, mlflow, env
    cluster.stop()
    mlflow.stop()
    s3.stop()


def test_submitted_twice_both_succeed_and_the_second_teaches_nothing(world) -> None:
    cluster, s3, mlflow, env = world
    storage = f"storage=s3://{s3.bucket}/kdpipe"
    first = submit(cluster.dashboard, env, storage)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "taught 1797 rows" in first.stdout and "registered model: models:/digits-student/1" in first.stdout
    second = submit(cluster.dashboard, env, storage)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "(reused, fingerprint" in second.stdout and "taught" not in second.stdout.split("MLflow run:")[0]
    assert "registered model: models:/digits-student/2" in second.stdout
    assert "teacher digits_mlp: reusing s3://" in second.stdout  # the teacher trained by the first job, from the bucket

    # quiet job logs: kdpipe's lines, not every library's debug output
    assert "font_manager" not in first.stdout and "urllib3" not in first.stdout
    # the runs know the code they ran, computed where the user submitted
    client = MlflowClient(mlflow.uri)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    v = client.get_model_version("digits-student", "2")
    assert v.tags["kdpipe.git_commit"] == head != "unknown"
    # nothing of kdpipe's landed in a job folder; everything is in the bucket
    assert not [p for d in cluster.job_dirs() for p in d.rglob(".kdpipe")]
    fs = s3.filesystem()
    listed = {
        f.path.split("/")[2]
        for f in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector(f"{s3.bucket}/kdpipe", recursive=True))
        if f.path.count("/") >= 2
    }
    assert {"cache", "teachers", "ray_results", "index"} <= listed, listed
    assert _ran_on_worker_node(cluster), "no task or actor of the jobs ran on the second node"


def test_a_storage_root_in_the_job_folder_is_refused_before_anything_runs(world) -> None:
    cluster, s3, _, env = world
    out = submit(cluster.dashboard, env)  # the spec's default: a relative .kdpipe, i.e. inside the job's folder
    assert out.returncode == 1
    assert "inside this Ray job's working directory" in out.stdout and "s3://" in out.stdout
    assert "Traceback" not in out.stdout.split("kdpipe: error:")[-1]


def test_a_storage_root_on_one_nodes_disk_is_refused(world) -> None:
    cluster, s3, _, env = world
    if not cluster.separate_disks:
        pytest.skip("this machine cannot give the worker node a disk view of its own (no mount namespace)")
    out = submit(cluster.dashboard, env, f"storage={cluster.head_local / 'kdpipe'}")
    assert out.returncode == 1
    assert "is not shared by every node" in out.stdout and "cannot read what the driver wrote" in out.stdout


def test_a_tracking_uri_only_this_machine_can_write_is_refused_before_submitting(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    out = subprocess.run(
        [
            str(BIN / "kdpipe"),
            "submit",
            "pipelines/digits_kd.yaml",
            "--address",
            "http://127.0.0.1:9",
            "--set",
            "storage=s3://bucket/kdpipe",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "mlflow server" in out.stderr and "Traceback" not in out.stderr


def _ran_on_worker_node(cluster: RayCluster) -> list[str]:
    """Names of the tasks and actors that ran on the non-head node (Ray's state API)."""
    from ray.util.state import list_actors, list_nodes, list_tasks

    nodes = list_nodes(address=cluster.dashboard)
    worker = [n.node_id for n in nodes if not n.is_head_node]
    assert len(worker) == 1, nodes
    tasks = list_tasks(
        address=cluster.dashboard, filters=[("node_id", "=", worker[0])], limit=10_000, raise_on_missing_output=False
    )
    actors = list_actors(
        address=cluster.dashboard, filters=[("node_id", "=", worker[0])], limit=10_000, raise_on_missing_output=False
    )
    return sorted({t.name for t in tasks} | {a.class_name for a in actors})


@pytest.mark.slow  # a causal LM pretrained once by the job, then taught and distilled across the nodes (~3 min)
def test_a_tiny_language_model_spec_submitted_the_same_way(world) -> None:
    """The LM pipeline as the README says to submit it: the job's driver pretrains the teacher once
    into the bucket, the teach actors and the training workers fetch it once per node, and the
    student is registered as a Hugging Face model; a second submission teaches nothing."""
    cluster, s3, mlflow, env = world
    sets = {
        "storage": f"s3://{s3.bucket}/kdpipe-lm",
        "source.limit": 120,
        "teachers.0.params.pretrain": TINY,
        "teachers.0.params.max_length": 24,
        "teachers.0.topk": 16,
        "student.params": {"tokens_from": "lm", "num_layers": 1, "init_from_teacher_layers": [0]},
        "train.epochs": 1,
        "train.num_workers": 1,
        "evaluate.baseline": False,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]

    def lm_submit() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "kdpipe"), "submit", "pipelines/lm_distill.yaml", "--address", cluster.dashboard, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    first = lm_submit()
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "registered model: models:/lm-student/1" in first.stdout and "taught" in first.stdout
    second = lm_submit()
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert "(reused, fingerprint" in second.stdout and "models:/lm-student/2" in second.stdout
    assert not [p for d in cluster.job_dirs() for p in d.rglob(".kdpipe")]


@pytest.mark.slow  # a head of its own, with Ray's token authentication on
def test_a_cluster_that_wants_a_token_gets_a_one_line_error(tmp_path: Path) -> None:
    from tests.servers import free_port, wait_http

    port, dash = free_port(), free_port()
    tmp = Path("/tmp") / f"kdtok{os.getpid()}{port}"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")},
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": "a" * 32,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={tmp}",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    try:
        # the dashboard answers 401 without the token: up, and guarded
        wait_http(f"http://127.0.0.1:{dash}/api/version", headers={"Authorization": f"Bearer {'a' * 32}"})
        user = {
            **{k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")},
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
            "RAY_AUTH_MODE": "disabled",
        }
        out = subprocess.run(
            [
                str(BIN / "kdpipe"),
                "submit",
                "pipelines/digits_kd.yaml",
                "--address",
                f"http://127.0.0.1:{dash}",
                "--set",
                "storage=s3://bucket/kdpipe",
            ],
            cwd=ROOT,
            env=user,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 1, out.stdout + out.stderr
        assert "refused the request" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        import psutil

        for p in psutil.process_iter(["cmdline"]):
            try:
                if str(tmp) in " ".join(p.info["cmdline"] or []) or f"127.0.0.1:{port}" in " ".join(
                    p.info["cmdline"] or []
                ):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

"""Nothing of Ray listens beyond loopback in the embedded mode: a plain `kdpipe run`, watched while
it runs, opens no socket on all interfaces in Ray's GCS, raylet, workers, agents and Ray Data
processes. The one exception is PyTorch's distributed rendezvous store (c10d TCPStore), which rank
0 of Ray Train's DDP group opens on all interfaces while training runs: torch 2.13 has no setting
for its bind address. The cluster manifests keep Ray's Jobs API off the network."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import yaml

from tests.conftest import ROOT, tiny_overrides
from tests.servers import BIN


def _listening(proc: psutil.Process) -> set[tuple[str, int, str]]:
    out = set()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            name = " ".join(p.cmdline())[:80]
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((c.laddr.ip, c.laddr.port, name))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def test_a_local_run_listens_on_loopback_only(tmp_path: Path) -> None:
    sets = [a for k, v in tiny_overrides(tmp_path, **{"evaluate.baseline": False}).items()
            for a in ("--set", f"{k}={json.dumps(v)}")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.Popen([str(BIN / "kdpipe"), "run", "pipelines/digits_kd.yaml", *sets], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(proc.pid)
    seen: set[tuple[str, int, str]] = set()
    while proc.poll() is None:
        seen |= _listening(watched)
        time.sleep(0.5)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out[-3000:]
    assert "registered model" in out
    assert len(seen) >= 5, seen  # Ray's processes were watched while they listened
    wide = sorted(s for s in seen if s[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1"))
    torch_store = {port for _, port, name in wide if name.startswith("ray::RayTrainWorker")}
    assert len(torch_store) <= 1, wide  # rank 0's c10d store: one port
    assert [s for s in wide if s[1] not in torch_store] == [], wide


def test_cluster_manifests_keep_the_jobs_api_off_the_network() -> None:
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text()) if d]
    job = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["rayjob.yaml"])
    assert job["spec"]["submissionMode"] == "SidecarMode"  # submitted from inside the head pod
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") in (None, "127.0.0.1")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= head["template"]["metadata"]["labels"].items()
    dashboard = [r for r in policy["spec"]["ingress"] if any(p["port"] == 8265 for p in r["ports"])]
    assert len(dashboard) == 1 and dashboard[0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kuberay-operator"}  # only the operator reaches the Jobs API
    assert not any(p.get("port", 0) <= 8265 <= p.get("endPort", p.get("port", 0))
                   for r in policy["spec"]["ingress"] if r is not dashboard[0] for p in r["ports"])

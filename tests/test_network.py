"""The cluster manifests keep Ray's Jobs API off the network. (That an embedded `kdpipe` run listens
on loopback only is checked while two real runs go on, in tests/test_concurrency.py.)"""

from __future__ import annotations

import yaml

from tests.conftest import ROOT


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
        "app.kubernetes.io/name": "kuberay-operator"
    }  # only the operator reaches the Jobs API
    assert not any(
        p.get("port", 0) <= 8265 <= p.get("endPort", p.get("port", 0))
        for r in policy["spec"]["ingress"]
        if r is not dashboard[0]
        for p in r["ports"]
    )

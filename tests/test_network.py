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


def test_the_kdpipe_command_turns_off_the_libraries_usage_reporting() -> None:
    """Outside CI (where MLflow stays quiet by itself), MLflow would call its telemetry host from a
    user's run: the opt-out kdpipe sets before importing it is the one this MLflow reads. A shell
    that set the variable itself keeps its value."""
    import os
    import re
    import subprocess
    import sys

    probe = (
        "import os; from kdpipe.runtime import no_phone_home; no_phone_home(os.environ); "
        "from mlflow.telemetry.utils import is_telemetry_disabled; "
        "print(is_telemetry_disabled(), os.environ['RAY_USAGE_STATS_ENABLED'])"
    )
    import inspect

    from mlflow.telemetry import utils

    # every marker MLflow reads as "in CI", from its own source, and the two opt-outs
    ci = {*re.findall(r'"([A-Z_]+)",', inspect.getsource(utils._is_ci_env_or_testing)), "MLFLOW_DISABLE_TELEMETRY"}
    assert {"CI", "PYTEST_CURRENT_TEST"} <= ci, ci
    env = {k: v for k, v in os.environ.items() if k not in ci | {"DO_NOT_TRACK"}}
    bare = "import os; from mlflow.telemetry.utils import is_telemetry_disabled; print(is_telemetry_disabled())"
    run = [sys.executable, "-c"]
    assert subprocess.run([*run, bare], env=env, capture_output=True, text=True).stdout.split() == ["False"]
    out = subprocess.run([*run, probe], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "0"], out.stderr[-2000:]
    mine = subprocess.run([*run, probe], env={**env, "RAY_USAGE_STATS_ENABLED": "1"}, capture_output=True, text=True)
    assert mine.stdout.split() == ["True", "1"], mine.stderr[-2000:]

"""`kdpipe submit` against a real multi-node Ray cluster started on this machine (head + worker node)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_overrides
from tests.servers import RayCluster

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # a second Ray cluster beside the session one: `make test-all`


def test_submit_default_pipeline_to_cluster(tmp_path: Path, capsys) -> None:
    from kdpipe.ops import submit

    cluster = RayCluster(tmp_path / "ray")
    try:
        o = tiny_overrides(tmp_path, **{"evaluate.baseline": False})
        sets = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]" for k, v in o.items()]
        job_id, status = submit("pipelines/digits_kd.yaml", cluster.dashboard, sets, follow=True, timeout_s=600)
        on_worker = _work_on_worker_node(cluster)
    finally:
        cluster.stop()
    out = capsys.readouterr().out
    assert status == "SUCCEEDED", out[-3000:]
    assert "MLflow run:" in out and "registered model: models:/digits-student/1" in out
    client = MlflowClient(o["tracking.tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("kdpipe-digits").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert (tmp_path / "cache" / "digits_mlp").is_dir()
    assert on_worker, "no task or actor of the job ran on the second node"


def _work_on_worker_node(cluster: RayCluster) -> list[str]:
    """Names of the tasks and actors that ran on the non-head node (Ray's state API)."""
    from ray.util.state import list_actors, list_nodes, list_tasks

    nodes = list_nodes(address=cluster.dashboard)
    worker = [n.node_id for n in nodes if not n.is_head_node]
    assert len(worker) == 1, nodes
    tasks = list_tasks(address=cluster.dashboard, filters=[("node_id", "=", worker[0])], limit=10_000, raise_on_missing_output=False)
    actors = list_actors(address=cluster.dashboard, filters=[("node_id", "=", worker[0])], limit=10_000, raise_on_missing_output=False)
    return sorted({t.name for t in tasks} | {a.class_name for a in actors})

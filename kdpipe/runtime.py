"""The one place Ray is started: embedded local Ray by default, a cluster when an address is given."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from typing import Any

from kdpipe import storage
from kdpipe.errors import StorageError

log = logging.getLogger("kdpipe")


LOOPBACK_ENV = {
    # Ray's own switch for a one-machine cluster (what it does on macOS and Windows): the node's
    # address is 127.0.0.1, and its GCS, raylet, workers and agents then listen on loopback only.
    # Read when Ray is imported, so it is set before that (`embedded_loopback`).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


NO_PHONE_HOME_ENV = {
    # the libraries' own opt-outs of usage reporting: a kdpipe run talks to the storage, tracking
    # server and cluster the user named, nothing else (MLflow would call config.mlflow-telemetry.io)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def no_phone_home(environ: Any) -> None:
    """Before MLflow or Ray is imported; a value the user exported wins."""
    for key, value in NO_PHONE_HOME_ENV.items():
        environ.setdefault(key, value)


def embedded_loopback(environ: Any, address: str | None) -> None:
    """Before Ray is imported: an embedded local Ray (no address given, none in `RAY_ADDRESS`)
    listens on loopback only; a value the user exported wins."""
    if not (address or environ.get("RAY_ADDRESS")):
        for key, value in LOOPBACK_ENV.items():
            environ.setdefault(key, value)


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        embedded_loopback(os.environ, None)  # for the processes Ray starts (the driver's was read at import)
        local_train_settings(os.environ)
        # Local: the dashboard stays off (and would bind to 127.0.0.1 only); all the machine's CPUs.
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            log_to_driver=verbose or os.environ.get("KDPIPE_RAY_LOGS") == "1",
            logging_level=logging.WARNING,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()  # bars in a terminal, plain lines in logs and CI
    ctx.print_on_execution_start = False
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        # Ray Data's default Parquet reader (datasource V2) starts a pool of 32 footer-reader actors
        # for every `read_parquet`: ~1 s per read of a 33 KB file on 2 CPUs, paid by every cache
        # and index read; the V1 reader ~0.1 s (`python bench/platform_costs.py`).
        ctx.use_datasource_v2 = False


def check_job_folder(root: str) -> None:
    """Refuse a local storage root inside the working directory of the Ray job this driver runs in:
    Ray deletes that folder when the job ends, and it is another folder on every node. Read from the
    job config Ray hands the entrypoint, so it runs before anything (data index, quarantine) is written."""
    if storage.is_remote(root):
        return
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") or "{}")
    except ValueError:
        return
    if not (job.get("runtime_env") or {}).get("working_dir"):
        return
    cwd = os.path.realpath(os.getcwd())
    path = os.path.realpath(storage.local(root))
    if path == cwd or path.startswith(cwd + os.sep):
        raise StorageError(
            f"storage: '{root}' is inside this Ray job's working directory, which Ray deletes when the job "
            "ends (and which is another folder on every node): every cache and trained teacher would be "
            "lost. Set `storage:` to a URI every node reaches (s3://bucket/kdpipe, gs://…) or a shared "
            "filesystem path (an NFS mount or a PVC mounted on every node)"
        )


def check_storage(root: str) -> None:
    """Refuse, before anything runs, a storage root that this Ray cluster's nodes cannot all use:
    a path inside a Ray job's working directory, or, on a multi-node cluster, a root that some node
    cannot read and write (a node-local path; a bucket a node has no credentials for) — checked by a
    probe task on every node."""
    import ray

    check_job_folder(root)
    if not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex[:12]
    probe_dir = storage.join(root, ".probe")
    storage.write_text(storage.join(probe_dir, f"{token}.driver"), token)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=0, max_retries=0)(_probe)
        refs = {
            n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                name="kdpipe-storage-probe",
            ).remote(probe_dir, token, n["NodeID"][:8])
            for n in nodes
        }
        bad = {node: why for node, why in zip(refs, ray.get(list(refs.values()), timeout=300)) if why}
    finally:
        for f in storage.files_under(probe_dir, (".driver", ".node")):
            if token in f:
                storage.delete_file(f)
    if bad:
        detail = "; ".join(f"{node}: {why}" for node, why in bad.items())
        raise StorageError(
            f"storage: '{root}' is not shared by every node of this cluster ({detail}). Set `storage:` "
            "to a URI every node reaches (s3://bucket/kdpipe, gs://…) with its credentials on every "
            "node, or to a filesystem mounted at the same path on every node"
        )


def _probe(probe_dir: str, token: str, node: str) -> str:
    """On one node: read the driver's marker and write one of its own; '' when both work, else why not."""

    try:
        if storage.read_text(storage.join(probe_dir, f"{token}.driver")) != token:
            return "it reads another file at that location"
    except (FileNotFoundError, OSError) as e:
        return f"it cannot read what the driver wrote there ({type(e).__name__}: {e})"
    try:
        storage.write_text(storage.join(probe_dir, f"{token}-{node}.node"), token)
    except OSError as e:
        return f"it cannot write there ({type(e).__name__}: {e})"
    return ""


def ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def stop_local_ray() -> None:
    """`ray.shutdown()` when a command that started Ray is done (the embedded cluster stops; a
    cluster's driver only disconnects). Ray's own exit hook would do it too, after sleeping 0.5 s
    so that workers' forwarded log lines can print; kdpipe forwards none unless `-v`."""
    if ray_is_up():
        import ray

        ray.shutdown()


LOCAL_TRAIN_ENV = {
    # The Train controller polls its workers this often, and `ray.train.report` blocks until the
    # previous report was polled (the workers' result queue holds one): at Ray's default 2 s, each
    # checkpointed epoch of a small student cost ~2 s (`report_wait` in bench/platform_costs.py).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # A local machine is not preempted: no watcher actor (one process start less per fit).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def local_train_settings(environ: Any) -> None:
    """Ray Train's settings for the embedded local cluster, set before Ray starts so that its
    processes inherit them; a value the user exported wins. A cluster keeps its own (its
    controller runs elsewhere; set these in the job's runtime_env there if wanted)."""
    for key, value in LOCAL_TRAIN_ENV.items():
        environ.setdefault(key, value)


def default_cpus_per_worker(num_workers: int) -> float:
    """Half the cluster's CPUs for training, the rest for Ray Data feeding it.

    Giving the workers every CPU starves the read/map tasks behind `get_dataset_shard`, and
    the fit hangs silently (measured on 2 CPUs: see PLATFORM_NOTES).
    """
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 2))
    return max(0.25, min(1.0, cpus / 2 / num_workers)) if cpus <= 4 else max(1.0, (cpus - 2) // num_workers)

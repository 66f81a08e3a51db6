"""MLflow: where runs go, tolerant metric logging from rank 0, and model logging."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow.tracking import MlflowClient

from kdpipe.errors import KdpipeError

log = logging.getLogger("kdpipe.tracking")
T = TypeVar("T")


class TrackingUnavailableError(KdpipeError):
    pass


@dataclass
class DatasetRef:
    """What a run read, as an MLflow dataset input: `columns` in MLflow's column-spec form."""

    name: str
    digest: str
    uri: str
    context: str
    columns: list[dict[str, Any]] | None = None
    profile: dict[str, Any] | None = None


TRANSIENT = (
    "UNIQUE constraint failed",
    "database is locked",
    "Connection aborted",
    "Read timed out",
    "503 Service Unavailable",
    "502 Bad Gateway",
)


def retrying(fn: Callable[[], T], what: str, attempts: int = 5) -> T:
    """`fn()`, retried with back-off on the store errors two writers at once produce (a sqlite
    store's unique index or lock, a tracking server briefly unavailable); other errors at once."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return fn()
        except (MlflowException, OSError) as e:
            if attempt == attempts - 1 or not any(t in str(e) for t in TRANSIENT):
                raise
            log.info("could not %s (%s); retrying", what, str(e).splitlines()[0][:120])
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


METRICS_PER_BATCH = 500  # under MLflow's 1,000 metrics per log_batch request
PARAMS_PER_BATCH = 100  # MLflow's limit of params per log_batch request


def client(uri: str | None = None) -> Any:
    """The MLflow client of a tracking URI: the one place kdpipe makes one (the default URI as
    `resolve_tracking_uri` gives it)."""
    return MlflowClient(resolve_tracking_uri(uri) if uri is None else uri)


def log_metric_batch(mlflow_client: Any, run_id: str, metrics: list[Any]) -> None:
    """`Metric`s in batches MLflow accepts; each batch sent once (a retry would send metrics twice)."""
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        mlflow_client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])


def log_param_batch(mlflow_client: Any, run_id: str, params: list[Any]) -> None:
    for i in range(0, len(params), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])


def resolve_tracking_uri(spec_uri: str | None) -> str:
    """Spec > $MLFLOW_TRACKING_URI > a sqlite store in the working directory."""
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlruns.db').resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any compute when the tracking server cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingUnavailableError(f"MLflow at {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable ({e}); start it, or unset MLFLOW_TRACKING_URI / "
                "tracking.tracking_uri to use the local sqlite store"
            ) from None
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the local store, not in the cwd
        artifact_location = Path(uri.removeprefix("sqlite:///")).with_name("mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


class MetricsLogger:
    """Per-epoch metrics from rank 0; if MLflow goes away mid-run, training continues and the
    metrics stay buffered (retried at the next epoch and at the end)."""

    def __init__(self, uri: str, run_id: str, prefix: str = "") -> None:
        self.client = client(uri)
        self.run_id = run_id
        self.prefix = prefix
        self.buffer: list[Any] = []
        self.failures = 0
        self.skip_through = -1  # after a restart: epochs up to this one are in MLflow already

    def last_step(self, metric: str) -> int:
        """The last epoch MLflow holds for `<prefix><metric>` (-1: none, or MLflow unreachable)."""
        try:
            return max((m.step for m in self.client.get_metric_history(self.run_id, self.prefix + metric)), default=-1)
        except Exception:  # noqa: BLE001 - then a replayed epoch may be logged twice; training goes on
            return -1

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.skip_through:
            return
        ts = int(time.time() * 1000)
        self.buffer += [Metric(f"{self.prefix}{k}", float(v), ts, step) for k, v in metrics.items() if k != "epoch"]
        self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        try:
            log_metric_batch(self.client, self.run_id, self.buffer)
            self.buffer.clear()
        except Exception as e:  # noqa: BLE001 - tracking must never kill training
            self.failures += 1
            log.warning("MLflow logging failed (%s); %d metrics buffered, training continues", e, len(self.buffer))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return {k: v[:6000] for k, v in out.items()}


def git_commit() -> str:
    """The commit of the code that runs: `$KDPIPE_GIT_COMMIT` when set (a Ray job's folder has no
    .git; `kdpipe submit` sets it where the user submits), else `git rev-parse` of this checkout."""
    import subprocess

    if os.environ.get("KDPIPE_GIT_COMMIT"):
        return os.environ["KDPIPE_GIT_COMMIT"]
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class TrackedRun:
    """One MLflow run of a distil cycle as a context: created with its lineage tags, marked
    FINISHED on a clean exit and FAILED on any error (the original error is never masked)."""

    def __init__(self, uri: str, experiment: str, name: str, tags: dict[str, str], system_metrics: bool = True) -> None:
        import mlflow

        mlflow.set_tracking_uri(uri)  # the fluent API (model logging) writes to this run's store
        self.uri = uri
        self.client = client(uri)
        self.lineage = dict(tags)
        exp_id = ensure_experiment(self.client, experiment, uri)
        self.run_id = self.client.create_run(exp_id, run_name=name, tags={**tags, "mlflow.runName": name}).info.run_id
        self._monitor = None
        if system_metrics:  # CPU, memory, disk, network of this node (`system/…` on the run page)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=uri)

    def __enter__(self) -> TrackedRun:
        if self._monitor is not None:
            self._monitor.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:  # noqa: BLE001 - system metrics are a convenience
                log.debug("system metrics monitor: %s", e)
        try:
            self.client.set_terminated(self.run_id, "FINISHED" if exc_type is None else "FAILED")
        except Exception as e:  # noqa: BLE001 - never mask the original error
            if exc_type is None:
                raise
            log.warning("could not mark MLflow run %s FAILED: %s", self.run_id, e)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        log_metric_batch(self.client, self.run_id, items)

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        log_param_batch(self.client, self.run_id, items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_figure(self, figure: Any, path: str) -> None:
        self.client.log_figure(self.run_id, figure, path)

    def metric_history(
        self, prefix: str, kinds: tuple[str, ...] = ("train_", "val_")
    ) -> dict[str, list[tuple[int, float]]]:
        """Every epoch of the metrics `<prefix><kind>…` this run recorded, by name without the prefix."""
        starts = tuple(prefix + kind for kind in kinds)
        names = [k for k in self.client.get_run(self.run_id).data.metrics if k.startswith(starts)]
        return {
            k.removeprefix(prefix): [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, k)]
            for k in names
        }

    def log_datasets(self, datasets: list[DatasetRef]) -> None:
        """MLflow dataset inputs: the run page's Datasets section (with each one's columns and row
        counts), and a lineage query (`search_runs` by dataset digest) for every run that read them.
        Two runs logging the same dataset at once can collide in a sqlite store's unique index: retried."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=d.name,
                    digest=d.digest,
                    source_type="local"
                    if "://" not in d.uri or d.uri.startswith("file://")
                    else d.uri.split("://", 1)[0],
                    source=json.dumps({"uri": d.uri}),
                    schema=json.dumps({"mlflow_colspec": d.columns}) if d.columns else None,
                    profile=json.dumps(d.profile) if d.profile else None,
                ),
                tags=[InputTag("mlflow.data.context", d.context)],
            )
            for d in datasets
        ]
        retrying(lambda: self.client.log_inputs(self.run_id, datasets=inputs), "log the run's dataset inputs")

    def describe(self, markdown: str) -> None:
        """The run page's Description (MLflow's `mlflow.note.content` tag)."""
        self.client.set_tag(self.run_id, "mlflow.note.content", markdown)

"""Operating kdpipe: evaluate/list registered models, retraining cycles, schedules, cluster jobs."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe import model_registry as reg
from kdpipe import tracking
from kdpipe.config import load_spec
from kdpipe.cycle_lock import CycleLock
from kdpipe.errors import KdpipeError
from kdpipe.evaluate import evaluate
from kdpipe.pipeline import distil, locate_caches, prepare, teach
from kdpipe.spec import PipelineConfig, parse_override
from kdpipe.tracking import check_reachable, git_commit, resolve_tracking_uri
from kdpipe.views import build_views

log = logging.getLogger("kdpipe.ops")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def evaluate_registered(cfg: PipelineConfig, alias: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Score the registered model at `alias` on the spec's held-out test rows."""
    import mlflow

    source, uri = prepare(cfg, address)
    mlflow.set_tracking_uri(uri)
    client = tracking.client(uri)
    alias = alias or cfg.tracking.alias
    version = reg.alias_version(client, cfg.tracking.model_name, alias)
    if version is None:
        raise KdpipeError(
            f"model '{cfg.tracking.model_name}' has no alias '{alias}'; see `kdpipe models {cfg.tracking.model_name}`"
        )
    caches = locate_caches(cfg, source)
    views = build_views(source, {k: r.cache for k, r in caches.items()}, cfg.teach.verify)
    metrics: dict[str, Any] = {
        "model": f"{cfg.tracking.model_name}@{alias} (version {version.version})",
        "rows": views.rows["test"],
    }
    metrics.update(
        evaluate(
            cfg.evaluate.task,
            reg.RegisteredFactory(uri, version.name, str(version.version)),
            views.test,
            prefix="test_",
        )
    )
    return metrics


def list_models(name: str, tracking_uri: str | None = None) -> str:
    """One line per registered version: aliases, gate metric, gates, lineage."""
    client = tracking.client(resolve_tracking_uri(tracking_uri))
    model = client.get_registered_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    lines = [f"{'version':>7}  {'aliases':<12} {'metric':<24} {'gates':<6} {'source':<16} run"]
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags = v.tags or {}
        metric = next(
            ((k.removeprefix("metric."), float(val)) for k, val in tags.items() if k.startswith("metric.")), None
        )
        mtxt = f"{metric[0]}={metric[1]:.4f}" if metric else "-"
        lines.append(
            f"{v.version:>7}  {','.join(by_version.get(str(v.version), [])) or '-':<12} {mtxt:<24} "
            f"{tags.get('kdpipe.gates_passed', '-'):<6} {tags.get('kdpipe.source_fingerprint', '-'):<16} {v.run_id}"
        )
    return "\n".join(lines)


@dataclass
class CycleResult:
    skipped: bool
    reason: str
    run: Any = None  # RunResult when a student was trained


def last_complete_version(client: Any, name: str) -> Any | None:
    """The newest version whose cycle finished (tag `kdpipe.cycle_complete`): a cycle that crashed
    between registering and that tag must not make the next cycle think its data was handled."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    done = [v for v in versions if (v.tags or {}).get("kdpipe.cycle_complete") == "true"]
    return max(done, key=lambda v: int(v.version)) if done else None


def retrain(
    cfg: PipelineConfig, address: str | None = None, force: bool = False, warm_start: bool = False
) -> CycleResult:
    """One idempotent retraining cycle, one at a time per registered model.

    The cycle holds the model's lock (`kdpipe.cycle_lock`) from start to end; a cycle that finds it
    held does nothing and says by whom. New source rows (by source fingerprint, compared with the
    newest finished cycle) are taught incrementally (cached rows are reused), a challenger is
    trained and registered, and the alias moves only if it beats the champion re-scored on today's
    held-out rows, and still points at that champion.
    """
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_reachable(uri)
    with CycleLock(tracking.client(uri), cfg.tracking.model_name) as lock:
        if not lock.held:
            reason = f"lock held by {lock.holder} (another retrain cycle of {cfg.tracking.model_name} is running)"
            log.info("retrain: skipped: %s", reason)
            return CycleResult(True, reason)
        return _cycle(cfg, address, force, warm_start, lock)


def _cycle(cfg: PipelineConfig, address: str | None, force: bool, warm_start: bool, lock: Any) -> CycleResult:
    source, uri = prepare(cfg, address)
    client = tracking.client(uri)
    latest = last_complete_version(client, cfg.tracking.model_name)
    last_fp = (latest.tags or {}).get("kdpipe.source_fingerprint") if latest else None
    if last_fp == source.fingerprint and not force:
        reason = f"no new source data since version {latest.version} (source fingerprint {last_fp}); nothing to do"
        log.info(reason)
        return CycleResult(True, reason)
    taught = teach(cfg, source)
    init_state = None
    if warm_start:
        champ = reg.alias_version(client, cfg.tracking.model_name, cfg.tracking.alias)
        if champ is not None:
            init_state = reg.load_student_state(client, champ.run_id)
            log.info("warm start from %s version %s", cfg.tracking.model_name, champ.version)
    tags = {"kdpipe.cycle": "retrain", "kdpipe.previous_source_fingerprint": last_fp or "none"}
    run = distil(cfg, source, taught, uri, init_state=init_state, extra_tags=tags, lock=lock)
    return CycleResult(False, run.gate_reasons, run)


def promote_version(name: str, version: str, alias: str, tracking_uri: str | None = None, force: bool = False) -> str:
    """`kdpipe promote`: point `alias` at `version`; a version that failed its gates needs `force`."""
    client = tracking.client(resolve_tracking_uri(tracking_uri))
    v = client.get_model_version(name, str(version))
    reg.check_promotable(v, force)
    reg.promote(client, name, str(version), alias)
    forced = (v.tags or {}).get("kdpipe.gates_passed") == "False"
    if forced:
        client.set_model_version_tag(name, str(version), "kdpipe.forced_promotion", alias)
    return f"{name}: alias '{alias}' -> version {version}" + (" (forced: its gates had failed)" if forced else "")


def build_scheduler(
    spec_path: str,
    cron: str,
    overrides: dict[str, Any] | None = None,
    address: str | None = None,
    warm_start: bool = False,
    timezone: str = "UTC",
) -> Any:
    """An APScheduler `BlockingScheduler` running one `retrain` cycle per cron tick (5-field crontab)."""
    from apscheduler.schedulers.blocking import BlockingScheduler
    from apscheduler.triggers.cron import CronTrigger

    try:
        trigger = CronTrigger.from_crontab(cron, timezone=timezone)
    except ValueError as e:
        raise ValueError(f"--cron '{cron}' is not a 5-field crontab expression ({e}); e.g. \"0 3 * * *\"") from None
    load_spec(spec_path, overrides)  # fail now, not at 3 am

    def cycle() -> None:
        cfg = load_spec(spec_path, overrides)  # re-read: the spec may change between cycles
        res = retrain(cfg, address=address, warm_start=warm_start)
        log.info("retrain cycle: %s", res.reason)

    sched = BlockingScheduler(timezone=timezone)
    sched.add_job(cycle, trigger, id="kdpipe-retrain", max_instances=1, coalesce=True, misfire_grace_time=3600)
    return sched


def local_tracking_uri(uri: str) -> bool:
    """A store only this machine can write (a sqlite file or a local file store)."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def job_env(cfg: PipelineConfig | None = None) -> dict[str, str]:
    """What a Ray job of kdpipe needs from the submitting machine: the tracking server every node
    reaches, and the commit of the code it ships (the job's folder has no .git)."""

    env = {"KDPIPE_GIT_COMMIT": git_commit()}
    uri = (cfg.tracking.tracking_uri if cfg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or local_tracking_uri(uri):
        where = f"'{uri}'" if uri else "the default local sqlite store (sqlite:///<cwd>/mlruns.db)"
        raise KdpipeError(
            f"the job would track to {where}, which only the machine that holds the file can write: "
            "the job's driver runs on the cluster's head node. Run `mlflow server` where every node "
            "reaches it and set MLFLOW_TRACKING_URI=http://HOST:5000 (or tracking.tracking_uri) before "
            "submitting"
        )
    if not cfg or not cfg.tracking.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = uri
    for key in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_EC2_METADATA_DISABLED",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        if key in os.environ:  # credentials of the storage root and the tracking server, as the user has them
            env[key] = os.environ[key]
    return env


def submit(
    spec: str,
    address: str,
    overrides: list[str],
    follow: bool = True,
    extra_env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    cfg: PipelineConfig | None = None,
    command: str = "run",
    verbose: bool = False,
) -> tuple[str, str]:
    """Submit `kdpipe <command> SPEC` as a Ray job that ships this project as its working_dir, with
    the environment of `job_env`; follows its log unless `follow` is False."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = cfg or load_spec(spec, _overrides(overrides))
    env = {**job_env(cfg), **(extra_env or {})}
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    kwargs = dict(
        entrypoint=f"python -m kdpipe.cli {'-v ' if verbose else ''}{command} {shlex.quote(spec)} {sets}".strip(),
        runtime_env={
            "working_dir": str(PROJECT_ROOT),
            "excludes": [".venv", ".git", ".kdpipe", "mlruns.db", "mlartifacts", "**/__pycache__", "bench/results"],
            "env_vars": env,
        },
    )
    try:
        client = JobSubmissionClient(address)
        for attempt in range(30):  # a just-started head has no job agent for a few seconds
            try:
                job_id = client.submit_job(**kwargs)
                break
            except RuntimeError as e:
                if "No available agent" not in str(e) or attempt == 29:
                    raise
                time.sleep(2)
        print(f"submitted job {job_id} to {address}", flush=True)
        return job_id, _follow(client, job_id, follow, timeout_s, JobStatus)
    except AuthenticationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "authentication failed"
        raise KdpipeError(
            f"the Ray cluster at {address} refused the request ({first}); set RAY_AUTH_TOKEN to the "
            "cluster's token (or put it in ~/.ray/auth_token) and submit again"
        ) from None
    except ConnectionError as e:
        raise KdpipeError(
            f"no Ray dashboard answers at {address} ({e}); check the address and the port-forward "
            "(kubectl port-forward svc/<cluster>-head-svc 8265)"
        ) from None


def _overrides(overrides: list[str]) -> dict[str, Any]:

    return dict(parse_override(o) for o in overrides)


def _follow(client: Any, job_id: str, follow: bool, timeout_s: float | None, JobStatus: Any) -> str:
    start = time.time()
    status = client.get_job_status(job_id)
    printed = 0
    while follow and status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if timeout_s is not None and time.time() - start > timeout_s:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} did not finish in {timeout_s:.0f} s; stopped it")
        time.sleep(2)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        status = client.get_job_status(job_id)
    if follow:
        sys.stdout.write(client.get_job_logs(job_id)[printed:])
    return str(status.value if hasattr(status, "value") else status)

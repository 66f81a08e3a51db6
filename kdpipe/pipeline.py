"""Stages wired together: teach -> distil -> evaluate -> track/ship. The CLI calls these."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from kdpipe.config import KdpipeError, PipelineConfig
from kdpipe.sources import SourceData, load_source
from kdpipe.teach import TeachResult

log = logging.getLogger("kdpipe")


@dataclass
class RunResult:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    model_name: str
    model_version: str | None
    promoted: bool
    gate_reasons: str
    teach: dict[str, TeachResult] = field(default_factory=dict)
    table: str = ""


def quarantine_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.teach.cache_root).parent / "quarantine"


def prepare(cfg: PipelineConfig, address: str | None = None) -> tuple[SourceData, str]:
    """Everything that can fail fast happens before Ray starts: tracking reachable, data valid."""
    from kdpipe.runtime import init_ray
    from kdpipe.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_reachable(uri)
    source = load_source(cfg.source, quarantine_dir(cfg))
    if source.bad_rows:
        log.warning("%d bad input rows skipped; quarantined to %s", source.bad_rows, source.quarantine_path)
    init_ray(address)
    return source, uri


def teach(cfg: PipelineConfig, source: SourceData) -> dict[str, TeachResult]:
    from kdpipe.teach import teach_all

    return teach_all(cfg, source)


def student_meta(cfg: PipelineConfig, source: SourceData, table: pa.Table) -> Any:
    from kdpipe.train import StudentMeta

    import torch

    from kdpipe.data import torch_batch
    from kdpipe.train import build_student

    teachers = [t.id for t in cfg.teachers] + (["fused"] if cfg.teach.fusion else [])
    widths = {}
    for name in table.column_names:
        if "." in name and pa.types.is_fixed_size_list(table[name].type):
            widths[name] = table[name].type.list_size
    num_classes = source.num_classes or cfg.source.num_classes or 0
    meta = StudentMeta(in_dim=source.dim, num_classes=num_classes, teachers=teachers, widths=widths)
    # one forward pass on two rows tells losses the student's output widths ("student.hidden": 64, ...)
    with torch.no_grad():
        out = build_student(cfg.student.kind, cfg.student.params, meta).eval()(torch_batch(table.slice(0, 2)))
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 2:
            meta.widths[f"student.{k}"] = int(v.shape[-1])
    return meta


def distil_and_ship(cfg: PipelineConfig, source: SourceData, taught: dict[str, TeachResult], uri: str,
                    fail_at_epoch: int | None = None, init_state: dict[str, Any] | None = None,
                    extra_tags: dict[str, str] | None = None) -> RunResult:
    """One MLflow run: train the student (and its label-only twin), evaluate, register, gate, promote."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from kdpipe import model_registry as reg
    from kdpipe.data import hide_unlabeled, join_teacher_outputs, labeled_only, split_tables
    from kdpipe.evaluate import EVALUATORS, results_table, serving_example, teacher_accuracy
    from kdpipe.tracking import ensure_experiment, flatten, git_commit
    from kdpipe.train import build_student, fit

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, uri)
    table = hide_unlabeled(join_teacher_outputs(source.table, {k: r.cache for k, r in taught.items()}, cfg.teach.verify))
    splits = split_tables(table)
    meta = student_meta(cfg, source, table)
    lineage = {
        "kdpipe.spec_hash": cfg.spec_hash(), "kdpipe.source_fingerprint": source.fingerprint,
        "kdpipe.git_commit": git_commit(), "kdpipe.teachers": ",".join(sorted(taught)),
        **{f"kdpipe.cache.{tid}": r.fingerprint for tid, r in taught.items()},
        **(extra_tags or {}),
    }
    run = client.create_run(exp_id, run_name=cfg.name, tags={**lineage, "mlflow.runName": cfg.name})
    run_id = run.info.run_id
    try:
        params = flatten(cfg.model_dump(mode="json"))
        items = list(params.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "spec.yaml")
        for tid, r in taught.items():
            client.log_text(run_id, json.dumps(r.manifest(), indent=2), f"caches/{tid}/MANIFEST.json")
        if source.quarantine_path:  # the skipped rows and why, beside the run that skipped them
            client.log_artifact(run_id, source.quarantine_path, "quarantine")
        counts = {f"rows_{k}": v.num_rows for k, v in splits.items()}
        counts["rows_train_labeled"] = labeled_only(splits["train"]).num_rows
        counts["rows_bad_skipped"] = source.bad_rows
        counts.update({f"rows_taught_{tid}": r.rows_taught for tid, r in taught.items()})
        _log_metrics(client, run_id, counts)

        if cfg.m2mkd is not None:  # module-to-module pre-training, then end-to-end from those weights
            from kdpipe.m2mkd import pretrain_modules

            init_state = pretrain_modules(cfg, meta, splits, run_id=run_id, tracking_uri=uri)
        common = dict(meta=meta, student_kind=cfg.student.kind, student_params=cfg.student.params, train_cfg=cfg.train,
                      seed=cfg.seed, tracking_uri=uri, run_id=run_id)
        losses = [{"name": l.name, "weight": l.weight, **l.params()} for l in cfg.losses]
        res = fit(name=f"{cfg.name}-student", train=splits["train"], val=splits["val"], losses=losses,
                  fail_at_epoch=fail_at_epoch, init_state=init_state, **common)
        evaluator = EVALUATORS.get(cfg.evaluate.task)
        student = build_student(cfg.student.kind, cfg.student.params, meta)
        student.load_state_dict(res.state)
        metrics = evaluator(student, splits["test"], prefix="test_")
        rows: dict[str, Any] = {}
        for tid in taught:
            acc = teacher_accuracy(splits["test"], tid)
            if acc is not None:
                metrics[f"teacher_{tid}_test_acc"] = acc
                rows[f"teacher {tid}"] = acc
        gate_metric = cfg.tracking.gates.metric
        rows[f"student ({'+'.join(l.name for l in cfg.losses)})"] = metrics[gate_metric]
        baseline = None
        ev = cfg.evaluate
        if ev.baseline:
            bparams = {**cfg.student.params, **ev.baseline_student_params}
            btrain = labeled_only(splits["train"]) if ev.baseline_labeled_only else splits["train"]
            bres = fit(name=f"{cfg.name}-baseline", train=btrain, val=splits["val"], losses=ev.baseline_losses,
                       prefix="baseline_", epochs=ev.baseline_epochs, **{**common, "student_params": bparams})
            bstudent = build_student(cfg.student.kind, bparams, meta)
            bstudent.load_state_dict(bres.state)
            bm = evaluator(bstudent, splits["test"], prefix="baseline_test_")
            metrics.update(bm)
            baseline = bm.get("baseline_" + gate_metric)
            rows[f"baseline twin ({'+'.join(l['name'] for l in ev.baseline_losses)})"] = baseline
        for k in [m for m in metrics if m.startswith("test_acc_exit")]:
            rows[f"student exit {k.removeprefix('test_acc_exit')}"] = metrics[k]
        _log_metrics(client, run_id, metrics)

        champion = None
        champ_v = reg.alias_version(client, cfg.tracking.model_name, cfg.tracking.alias)
        if champ_v is not None:  # re-evaluate the champion on today's held-out rows, not its old score
            champ_metrics = evaluator(reg.load_served(champ_v), splits["test"], prefix="champion_test_")
            champion = champ_metrics.get("champion_" + gate_metric)
            metrics.update(champ_metrics)
            metrics["champion_version"] = float(champ_v.version)
            rows[f"champion v{champ_v.version}"] = champion
            _log_metrics(client, run_id, champ_metrics)
        gate = reg.evaluate_gates(metrics, cfg.tracking.gates, baseline, champion)
        reg.log_student_state(client, run_id, res.state)
        tags = {**lineage, "kdpipe.run_id": run_id, "kdpipe.gates": json.dumps(gate.checks), "kdpipe.gates_passed": str(gate.passed),
                f"metric.{gate_metric}": repr(float(metrics[gate_metric])),
                "kdpipe.serving_inputs": json.dumps(list(getattr(student, "serving_inputs", ["x"]))),
                "kdpipe.serving_output": getattr(student, "serving_output", "logits")}
        version = reg.log_and_register(run_id, student, serving_example(student, splits["test"]), cfg.tracking.model_name, tags)
        if gate.passed:
            reg.promote(client, cfg.tracking.model_name, version.version, cfg.tracking.alias)
        # last: a version without this tag came from a cycle that crashed half-way (retrain ignores it)
        client.set_model_version_tag(cfg.tracking.model_name, str(version.version), "kdpipe.cycle_complete", "true")
        client.set_tag(run_id, "kdpipe.promoted", str(gate.passed))
        client.set_tag(run_id, "kdpipe.gate_reasons", gate.reasons())
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception as e:  # noqa: BLE001 - never mask the original error
            log.warning("could not mark MLflow run %s FAILED: %s", run_id, e)
        raise
    table_txt = results_table(rows, cfg.tracking.gates.metric)
    return RunResult(run_id, uri, metrics, cfg.tracking.model_name, str(version.version), gate.passed, gate.reasons(), taught, table_txt)


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float]) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])


def locate_caches(cfg: PipelineConfig, source: SourceData) -> dict[str, TeachResult]:
    """Find the complete caches for this spec without teaching (for `kdpipe distil`)."""
    from kdpipe.cache import TeacherCache
    from kdpipe.teach import teacher_fingerprint
    from teachers import TEACHERS

    out: dict[str, TeachResult] = {}
    for t in cfg.teachers:
        fp = teacher_fingerprint(t, TEACHERS.get(t.kind).weights_digest(t))
        cache = TeacherCache(Path(cfg.teach.cache_root) / t.id / fp)
        if not cache.is_complete():
            raise KdpipeError(f"no complete cache for teacher '{t.id}' at {cache.dir}; run `kdpipe teach SPEC` first")
        out[t.id] = TeachResult(t.id, cache, fp, 0, True)
    if cfg.teach.fusion is not None:
        from kdpipe.fusion import fuse_caches

        out["fused"] = fuse_caches(cfg, source, out)
    return out


def run(cfg: PipelineConfig, address: str | None = None, fail_at_epoch: int | None = None) -> RunResult:
    source, uri = prepare(cfg, address)
    taught = teach(cfg, source)
    return distil_and_ship(cfg, source, taught, uri, fail_at_epoch=fail_at_epoch)

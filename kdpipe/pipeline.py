"""Stages wired together: prepare -> teach -> distil (views -> train -> evaluate -> ship).

Each stage is one function with one job; `run` and `distil` only call them in order. Rows
flow through Ray Data between stages (`kdpipe.views`); the driver holds metrics and weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml
from mlflow.entities.model_registry import ModelVersion
from ray.data import Dataset

from kdpipe import figures, storage
from kdpipe import model_registry as reg
from kdpipe.cycle_lock import CycleLock
from kdpipe.data import SourceData, load_source
from kdpipe.errors import KdpipeError
from kdpipe.evaluate import ModelFactory, evaluate_models, float_batch, results_table, serving_example, teacher_prefix
from kdpipe.fuse_stage import fuse_caches
from kdpipe.lm.corpus import default_tokenizer
from kdpipe.losses import vocabulary_bound
from kdpipe.m2mkd import pretrain_modules as m2m
from kdpipe.model_registry import GateResult
from kdpipe.runtime import check_job_folder, check_storage, init_ray
from kdpipe.spec import PipelineConfig
from kdpipe.teach import TeachResult, cache_of, teach_all
from kdpipe.tracking import DatasetRef, TrackedRun, check_reachable, flatten, git_commit, resolve_tracking_uri
from kdpipe.train import FitResult, Job, StudentFactory, StudentMeta, build_student, fit, fits_whole
from kdpipe.views import SplitViews, build_views, count_labeled, labeled_only
from teachers.hf_causal_lm import check_vocab_compatible, model_dir

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


@dataclass
class Scores:
    """Held-out metrics of one cycle and the rows of its results table."""

    metrics: dict[str, float] = field(default_factory=dict)
    rows: dict[str, Any] = field(default_factory=dict)
    baseline: float | None = None
    champion: float | None = None
    champion_version: str | None = None  # the alias's version when the run read it (what the gates compared)
    champion_blocked: str | None = None  # why the champion could not be scored on these rows
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)  # figure data by metric prefix


def quarantine_dir(cfg: PipelineConfig) -> str:
    """Bad rows are kept under the storage root (a bucket too, when `storage:` is a URI)."""
    return storage.Layout(cfg.storage).quarantine


# ------------------------------------------------------------------ prepare and teach


def prepare(cfg: PipelineConfig, address: str | None = None) -> tuple[SourceData, str]:
    """Everything that can fail fast happens before Ray starts: tracking reachable, data valid."""

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_reachable(uri)
    check_job_folder(cfg.storage)  # before the data index and quarantine are written under it
    source = load_source(cfg.source, quarantine_dir(cfg), storage.Layout(cfg.storage).index)
    if source.bad_rows:
        log.warning("%d bad input rows skipped; quarantined to %s", source.bad_rows, source.quarantine_path)
    check_rows(cfg, source)
    log.info("source: %d rows: %s", source.num_rows, source.describe_rows())
    init_ray(address)
    check_storage(cfg.storage)  # every node reaches the storage root, or nothing is taught or trained
    return source, uri


def check_rows(cfg: PipelineConfig, source: SourceData) -> None:
    """The splits every stage needs hold rows: no training on an empty train split, no comparison
    on an empty test split (or one without a label, where the gate metric needs labels)."""
    n, s = source.split_rows, cfg.source.split
    if not n:
        return
    fix = "add rows, or change source.split"
    if n.get("train", 0) == 0:
        raise KdpipeError(
            f"source: the train split holds no rows (of {source.num_rows}; source.split val={s.val}, "
            f"test={s.test}); {fix}"
        )
    if n.get("test", 0) == 0:
        raise KdpipeError(
            f"source: the test split holds no rows (source.split.test={s.test} of {source.num_rows} rows); "
            f"every model is compared on it: {fix} (test: 0.25 is the default)"
        )
    if cfg.evaluate.task == "classification" and source.labeled_rows.get("test", 0) == 0:
        raise KdpipeError(
            f"source: none of the {n['test']} test rows has a label, so {cfg.tracking.gates.metric} cannot "
            "be measured; give the source a `label:` column with labels on some of its rows"
        )


def teach(cfg: PipelineConfig, source: SourceData) -> dict[str, TeachResult]:

    taught = teach_all(cfg, source)
    if cfg.teach.fusion is not None:
        taught["fused"] = fuse_caches(cfg, source, taught)
    check_vocabularies(cfg)
    return taught


def check_vocabularies(cfg: PipelineConfig) -> None:
    """A causal-LM student must share its teachers' vocabulary, unless every loss compares sorted
    probabilities (`uld`): checked once the teachers exist (a pretrained one appears in `teach`)."""
    if cfg.student.kind != "causal_lm":
        return

    student_tok = cfg.student.params.get("teacher_path")
    if student_tok is None:
        student_tok = default_tokenizer()

    names = vocabulary_bound([{"name": l.name, **l.params()} for l in cfg.losses])
    for t in cfg.teachers:
        if t.kind == "hf_causal_lm":
            try:
                check_vocab_compatible(model_dir(t), student_tok, names)
            except ValueError as e:
                raise KdpipeError(f"teachers[{t.id}] and the student: {e}") from None


def locate_caches(cfg: PipelineConfig, source: SourceData) -> dict[str, TeachResult]:
    """Find the complete caches for this spec without teaching (for `kdpipe distil`)."""

    out: dict[str, TeachResult] = {}
    for t in cfg.teachers:
        _, fp, cache = cache_of(cfg, t, source)
        cache.check_usable(verify=False)  # a lost manifest is named as such (views verify the files)
        if not cache.is_complete():
            raise KdpipeError(f"no complete cache for teacher '{t.id}' at {cache.dir}; run `kdpipe teach SPEC` first")
        out[t.id] = TeachResult(t.id, cache, fp, 0, True)
    if cfg.teach.fusion is not None:
        out["fused"] = fuse_caches(cfg, source, out)
    return out


# ------------------------------------------------------------------ distil: the stages


def student_meta(cfg: PipelineConfig, source: SourceData, train: Dataset) -> StudentMeta:
    """What the student and its losses are built from: input width, classes, teachers, and the
    widths of the cached columns and of the student's own outputs (one forward on two rows)."""
    import torch

    teachers = [t.id for t in cfg.teachers] + (["fused"] if cfg.teach.fusion else [])
    sample = train.take_batch(2, batch_format="numpy")
    widths = {
        k: int(v.reshape(len(v), -1).shape[1]) for k, v in sample.items() if "." in k and getattr(v, "ndim", 1) >= 2
    }
    num_classes = source.num_classes or cfg.source.num_classes or 0
    meta = StudentMeta(
        in_dim=source.dim,
        num_classes=num_classes,
        teachers=teachers,
        widths=widths,
        class_names=source.class_names,
        feature_columns=source.feature_columns,
    )
    with torch.no_grad():
        out = build_student(cfg.student.kind, cfg.student.params, meta).eval()(float_batch(sample))
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 2:
            meta.widths[f"student.{k}"] = int(v.shape[-1])
    return meta


def open_run(
    cfg: PipelineConfig, source: SourceData, taught: dict[str, TeachResult], uri: str, extra_tags: dict[str, str] | None
) -> TrackedRun:
    """The cycle's MLflow run, tagged with its lineage: spec, source, caches, code."""

    lineage = {
        "kdpipe.spec_hash": cfg.spec_hash(),
        "kdpipe.source_fingerprint": source.fingerprint,
        "kdpipe.git_commit": git_commit(),
        "kdpipe.teachers": ",".join(sorted(taught)),
        **{f"kdpipe.cache.{tid}": r.fingerprint for tid, r in taught.items()},
        **(extra_tags or {}),
    }
    return TrackedRun(uri, cfg.tracking.experiment, cfg.name, lineage)


def log_inputs(
    run: TrackedRun, cfg: PipelineConfig, source: SourceData, taught: dict[str, TeachResult], views: SplitViews
) -> None:
    """Spec, params, cache manifests, quarantined rows and row counts: what this run read."""

    run.log_params(flatten(cfg.model_dump(mode="json")))
    run.client.log_text(run.run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "spec.yaml")
    for tid, r in taught.items():
        run.client.log_text(run.run_id, json.dumps(r.manifest(), indent=2), f"caches/{tid}/MANIFEST.json")
    if source.quarantine_path:  # the skipped rows and why, beside the run that skipped them
        q = source.quarantine_path
        if storage.is_remote(q):
            run.client.log_text(run.run_id, storage.read_text(q), f"quarantine/{storage.name(q)}")
        else:
            run.client.log_artifact(run.run_id, q, "quarantine")
    counts = {f"rows_{k}": v for k, v in views.rows.items()}
    counts["rows_train_labeled"] = count_labeled(views.train)
    twin = (
        f"; its twin on the {counts['rows_train_labeled']} labeled ones"
        if cfg.evaluate.baseline and cfg.evaluate.baseline_labeled_only
        else ""
    )
    log.info(
        "the student trains on %d train rows, %d of them labeled%s; models are compared on %d test rows",
        counts["rows_train"],
        counts["rows_train_labeled"],
        twin,
        counts["rows_test"],
    )
    counts["rows_bad_skipped"] = source.bad_rows
    counts.update({f"rows_taught_{tid}": r.rows_taught for tid, r in taught.items()})
    run.log_metrics(counts)
    run.log_datasets(dataset_inputs(cfg, source, taught))


def dataset_inputs(cfg: PipelineConfig, source: SourceData, taught: dict[str, TeachResult]) -> list[DatasetRef]:
    """The source and each teacher cache as MLflow dataset inputs, with their columns and row counts."""

    src = cfg.source
    where = storage.display(src.path) if src.path else f"{src.kind}:"
    columns: list[dict[str, Any]] = [{"type": "string", "name": src.id_column or "id"}]
    if source.feature_columns:
        columns += [{"type": "double", "name": c} for c in source.feature_columns]
    elif source.input_kind == "features":
        columns.append({"type": "array", "items": {"type": "float"}, "name": src.features or "x"})
    else:
        columns.append({"type": "string", "name": src.text or "text"})
    if source.num_classes:
        columns.append({"type": "string" if source.class_names else "long", "name": src.label or "label"})
    profile = {
        "num_rows": source.num_rows,
        "bad_rows": source.bad_rows,
        "num_classes": source.num_classes,
        **{f"rows_{s}": n for s, n in source.split_rows.items()},
        **{f"labeled_{s}": n for s, n in source.labeled_rows.items()},
    }
    out = [DatasetRef(f"source:{src.kind}", source.fingerprint, where, "source", columns, profile)]
    for tid, r in taught.items():
        m = r.manifest()
        cols = [
            {"type": "array", "items": {"type": "float"}, "name": n}
            if t.startswith(("fixed_size_list", "list"))
            else {
                "type": {
                    "string": "string",
                    "int32": "integer",
                    "int64": "long",
                    "float": "float",
                    "double": "double",
                    "binary": "binary",
                    "large_binary": "binary",
                }.get(t, "string"),
                "name": n,
            }
            for n, t in (m.get("schema") or {}).items()
        ]
        out.append(
            DatasetRef(
                f"cache:{tid}",
                r.fingerprint,
                storage.display(r.cache.dir),
                "teacher-cache",
                cols or None,
                {"num_rows": m.get("rows", 0), "parts": len(m.get("parts", []))},
            )
        )
    return out


def pretrain_modules(
    cfg: PipelineConfig, meta: StudentMeta, views: SplitViews, run: TrackedRun
) -> dict[str, Any] | None:
    """m2mKD: module-to-module pre-training, whose weights the end-to-end training starts from."""
    if cfg.m2mkd is None:
        return None

    return m2m(cfg, meta, {"train": views.train, "val": views.val}, run_id=run.run_id, tracking_uri=run.uri)


def train_students(
    cfg: PipelineConfig, meta: StudentMeta, views: SplitViews, run: TrackedRun, init_state: dict[str, Any] | None
) -> dict[str, FitResult]:
    """The distilled student and, with `evaluate.baseline`, its label-only twin (same student,
    same data budget, its own losses: what KD must beat), trained one after the other in one
    Ray Train run. Returns their weights by job name ("student", "baseline")."""

    ev = cfg.evaluate
    losses = [{"name": l.name, "weight": l.weight, **l.params()} for l in cfg.losses]
    jobs = [Job("student", "train", cfg.student.params, losses, cfg.train.epochs, init_state=init_state)]
    datasets = {"train": views.train, "val": views.val}
    if ev.baseline:
        key = "train_labeled" if ev.baseline_labeled_only else "train"
        small = fits_whole(views.train, cfg.train.keep_in_memory_mb * 2**20)  # then its filter is too
        datasets[key] = labeled_only(views.train, materialise=small) if ev.baseline_labeled_only else views.train
        jobs.append(
            Job(
                "baseline",
                key,
                baseline_params(cfg),
                ev.baseline_losses,
                ev.baseline_epochs or cfg.train.epochs,
                prefix="baseline_",
            )
        )
    return fit(
        name=cfg.name,
        datasets=datasets,
        jobs=jobs,
        meta=meta,
        student_kind=cfg.student.kind,
        train_cfg=cfg.train,
        seed=cfg.seed,
        tracking_uri=run.uri,
        run_id=run.run_id,
        storage_path=storage.Layout(cfg.storage).ray_results,
    )


def baseline_params(cfg: PipelineConfig) -> dict[str, Any]:
    return {**cfg.student.params, **cfg.evaluate.baseline_student_params}


def contenders(
    cfg: PipelineConfig, meta: StudentMeta, run: TrackedRun, fits: dict[str, FitResult]
) -> tuple[dict[str, ModelFactory], ModelVersion | None]:
    """What the test split scores, by metric prefix: the student, its twin, and the current
    champion (re-evaluated on today's held-out rows, not its old score); and the champion's version."""

    factories = {"test_": StudentFactory(cfg.student.kind, cfg.student.params, meta, fits["student"].state)}
    if "baseline" in fits:
        factories["baseline_test_"] = StudentFactory(
            cfg.student.kind, baseline_params(cfg), meta, fits["baseline"].state
        )
    champ_v = reg.alias_version(run.client, cfg.tracking.model_name, cfg.tracking.alias)
    if champ_v is not None and reg.comparable(champ_v, id_scheme(cfg), cfg.source.split.id_settings()) is None:
        factories["champion_test_"] = reg.RegisteredFactory(run.uri, champ_v.name, str(champ_v.version))
    return factories, champ_v


def id_scheme(cfg: PipelineConfig) -> str:
    """How this run's row ids are made: a content hash depends on how the values were read (a CSV
    cell's text and a Parquet float may differ), so the source format is part of it; an id column is not."""
    scheme = cfg.source.id_scheme()
    return scheme if cfg.source.id_column else f"{scheme}({cfg.source.kind})"


def score(
    cfg: PipelineConfig,
    meta: StudentMeta,
    views: SplitViews,
    taught: dict[str, TeachResult],
    factories: dict[str, ModelFactory],
    champ_v: ModelVersion | None,
) -> Scores:
    """Every contender and every cached teacher on the test view, in one `map_batches` pass."""

    gate_metric = cfg.tracking.gates.metric
    scored = evaluate_models(
        cfg.evaluate.task,
        factories,
        views.test,
        teachers=list(taught),
        num_classes=meta.num_classes,
        slices=cfg.evaluate.slices,
    )
    s = Scores(metrics=scored.metrics, arrays=scored.arrays)
    for tid in taught:
        if (acc := s.metrics.get(f"{teacher_prefix(tid)}acc")) is not None:
            s.rows[f"teacher {tid}"] = acc
    s.rows[f"student ({'+'.join(l.name for l in cfg.losses)})"] = s.metrics[gate_metric]
    if "baseline_test_" in factories:
        s.baseline = s.metrics.get("baseline_" + gate_metric)
        s.rows[f"baseline twin ({'+'.join(l['name'] for l in cfg.evaluate.baseline_losses)})"] = s.baseline
    for name in cfg.evaluate.slices:  # the gate metric on each slice's rows
        key = gate_metric.replace("test_", f"test_{name}_", 1)
        for row, k in ((f"student [{name}]", key), (f"baseline twin [{name}]", "baseline_" + key)):
            if k in s.metrics:
                s.rows[row] = s.metrics[k]
    for k in [m for m in s.metrics if m.startswith("test_acc_exit")]:
        s.rows[f"student exit {k.removeprefix('test_acc_exit')}"] = s.metrics[k]
    if champ_v is not None:
        s.champion_version = str(champ_v.version)
        s.champion_blocked = reg.comparable(champ_v, id_scheme(cfg), cfg.source.split.id_settings())
        s.metrics["champion_version"] = float(champ_v.version)
        if s.champion_blocked is None:
            s.champion = s.metrics.get("champion_" + gate_metric)
            s.rows[f"champion v{champ_v.version}"] = s.champion
        else:
            log.warning("not scoring champion v%s: %s", champ_v.version, s.champion_blocked)
    return s


def log_figures(
    cfg: PipelineConfig,
    run: TrackedRun,
    fits: dict[str, FitResult],
    scores: Scores,
    class_names: list[str] | None = None,
) -> None:
    """The run page's pictures: training curves of every loss part, every model on the gate
    metric, and the task's own (confusion matrix and reliability diagram for classifiers, cosine
    distribution for embedding students). A figure that fails to draw is logged, not fatal: the
    student is already trained."""

    history = {name: run.metric_history("baseline_" if name == "baseline" else "") for name in fits}
    drawings = {
        "figures/training_curves.png": lambda: figures.training_curves(history),
        "figures/gate_metric.png": lambda: figures.gate_bars(scores.rows, cfg.tracking.gates.metric),
        "figures/confusion.png": lambda: figures.confusion(scores.arrays, class_names=class_names),
        "figures/reliability.png": lambda: figures.reliability(scores.arrays),
        "figures/cosine.png": lambda: figures.cosine_hist(scores.arrays),
    }
    for path, draw in drawings.items():
        try:
            fig = draw()
            if fig is not None:
                run.log_figure(fig, path)
                figures.close(fig)
        except Exception as e:  # noqa: BLE001
            log.warning("could not draw %s: %s", path, e)


def describe(cfg: PipelineConfig, run: TrackedRun, version: ModelVersion, gate: GateResult, table: str) -> None:
    """The run page's Description: who taught whom, the results, and what the gates decided."""
    teachers = ", ".join(f"`{t.id}` ({t.kind})" for t in cfg.teachers)
    fused = f", fused ({cfg.teach.fusion.mode} weights)" if cfg.teach.fusion else ""
    losses = " + ".join(f"{l.weight:g}·{l.name}" for l in cfg.losses)
    verdict = f"promoted to `@{cfg.tracking.alias}`" if gate.passed else f"not promoted: {gate.reasons()}"
    run.describe(
        f"**{cfg.name}**: teacher(s) {teachers}{fused} → student `{cfg.student.kind}` "
        f"{json.dumps(cfg.student.params)} with {losses}.\n\n"
        f"Registered as `models:/{cfg.tracking.model_name}/{version.version}`, {verdict}.\n\n"
        f"```\n{table}\n```\n"
    )


def ship(
    cfg: PipelineConfig,
    meta: StudentMeta,
    views: SplitViews,
    run: TrackedRun,
    student: FitResult,
    scores: Scores,
    lock: CycleLock | None = None,
) -> tuple[ModelVersion, GateResult]:
    """Register the student with its lineage, promote the alias only past the gates (and only if
    the alias still points where this run read it, and the cycle still holds its lock), then mark
    the cycle complete (a version without that tag came from a cycle that crashed half-way)."""

    gate_metric = cfg.tracking.gates.metric
    gate = reg.evaluate_gates(
        scores.metrics, cfg.tracking.gates, scores.baseline, scores.champion, scores.champion_blocked
    )
    reg.log_student_state(run.client, run.run_id, student.state)
    model = build_student(cfg.student.kind, cfg.student.params, meta)
    model.load_state_dict(student.state)
    tags = {
        **run.lineage,
        "kdpipe.run_id": run.run_id,
        "kdpipe.gates": json.dumps(gate.checks),
        "kdpipe.gates_passed": str(gate.passed),
        f"metric.{gate_metric}": repr(float(scores.metrics[gate_metric])),
        "kdpipe.serving_inputs": json.dumps(list(getattr(model, "serving_inputs", ["x"]))),
        "kdpipe.serving_output": getattr(model, "serving_output", "logits"),
        "kdpipe.id_scheme": id_scheme(cfg),
        "kdpipe.split": json.dumps(cfg.source.split.id_settings(), sort_keys=True),
        "kdpipe.gate_reasons": gate.reasons(),
    }
    spec = {"kind": cfg.student.kind, "params": cfg.student.params, "meta": meta.as_dict()}
    if meta.class_names:
        tags["kdpipe.classes"] = json.dumps(meta.class_names)[:5000]
    version = reg.log_and_register(
        run.run_id,
        model,
        serving_example(model, views.test),
        cfg.tracking.model_name,
        tags,
        spec,
        columns=meta.feature_columns,
        classes=meta.class_names,
    )
    if getattr(model, "exit_depths", None) and hasattr(model, "save_hf"):
        reg.log_exit_models(run.client, run.run_id, model)
    if gate.passed and lock is not None and not lock.still_held():
        gate.fail("cycle_lock", f"another cycle took over this cycle's lock ({lock.holder}); the alias is left to it")
    if gate.passed:
        moved = reg.promote_if_unchanged(
            run.client, cfg.tracking.model_name, str(version.version), cfg.tracking.alias, scores.champion_version
        )
        if moved:
            gate.fail("alias_unchanged", moved)
    if not gate.passed:
        run.client.set_model_version_tag(cfg.tracking.model_name, str(version.version), "kdpipe.gates_passed", "False")
        run.client.set_model_version_tag(
            cfg.tracking.model_name, str(version.version), "kdpipe.gate_reasons", gate.reasons()
        )
    run.client.set_model_version_tag(cfg.tracking.model_name, str(version.version), "kdpipe.cycle_complete", "true")
    run.set_tags({"kdpipe.promoted": str(gate.passed), "kdpipe.gate_reasons": gate.reasons()})
    return version, gate


def distil(
    cfg: PipelineConfig,
    source: SourceData,
    taught: dict[str, TeachResult],
    uri: str,
    init_state: dict[str, Any] | None = None,
    extra_tags: dict[str, str] | None = None,
    lock: CycleLock | None = None,
) -> RunResult:
    """One MLflow run: views -> student (+ twin) -> scores (with the champion) -> ship."""

    views = build_views(source, {k: r.cache for k, r in taught.items()}, cfg.teach.verify)
    meta = student_meta(cfg, source, views.train)
    with open_run(cfg, source, taught, uri, extra_tags) as run:
        log_inputs(run, cfg, source, taught, views)
        init_state = pretrain_modules(cfg, meta, views, run) or init_state
        fits = train_students(cfg, meta, views, run, init_state)
        run.log_params({f"train_{k}": v for k, v in fits["student"].env.items()})
        scores = score(cfg, meta, views, taught, *contenders(cfg, meta, run, fits))
        run.log_metrics(scores.metrics)
        log_figures(cfg, run, fits, scores, meta.class_names)
        version, gate = ship(cfg, meta, views, run, fits["student"], scores, lock)
        table = results_table(scores.rows, cfg.tracking.gates.metric)
        describe(cfg, run, version, gate, table)
    return RunResult(
        run.run_id,
        uri,
        scores.metrics,
        cfg.tracking.model_name,
        str(version.version),
        gate.passed,
        gate.reasons(),
        taught,
        table,
    )


def run(cfg: PipelineConfig, address: str | None = None) -> RunResult:
    source, uri = prepare(cfg, address)
    taught = teach(cfg, source)
    return distil(cfg, source, taught, uri)

"""Method vs baselines over several seeds, on one embedded Ray: mean ± std of held-out accuracy.

``compare(spec, seeds, overrides, variants)`` runs every variant of a pipeline for every seed
(``seed`` seeds the student's init; the data split salt and the teachers stay fixed, so teacher
caches are taught once and reused), one MLflow run per variant and seed (``distil``, which
also trains the spec's baseline twin), then logs a summary run with the table as an artifact.

Variants are spec overrides keyed by a label (`VARIANTS` holds the ones for the shipped pipelines,
keyed by pipeline name; the strict spec has no place for them). A variant value ``BEST_SINGLE``
is replaced by the member teacher with the best validation accuracy (from its cache).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import uuid
from typing import Any

from kdpipe import tracking
from kdpipe.config import load_spec
from kdpipe.evaluate import teacher_accuracy_ds
from kdpipe.pipeline import distil, prepare, teach
from kdpipe.tracking import ensure_experiment
from kdpipe.views import build_views

log = logging.getLogger("kdpipe.compare")

BEST_SINGLE = "@best_single_teacher"  # resolved to the fusion member with the best val accuracy

_KD = {"name": "kd", "teacher": "digits_mlp", "weight": 1.0, "temperature": 4.0}
_CE = {"name": "ce", "weight": 1.0}
_ASPECTS = {"name": "aspect_bce", "teacher": "aspects", "weight": 2.0, "temperature": 1.0}

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "digits_fusion": {
        "student <- dynamic fusion": {"evaluate.baseline": False},
        "student <- uniform average": {"teach.fusion.mode": "uniform", "evaluate.baseline": False},
        "student <- best single teacher": {
            "losses.0.teacher": BEST_SINGLE,
            "teach.fusion": None,
            "evaluate.baseline": False,
        },
    },
    "digits_aspects": {
        # the paper's setting: labels + aspect answers; twin = same student without aspect units, CE only
        "ce + aspects": {},
    },
    "digits_selfdistill": {
        # twin = same multi-exit student, same KD, per-exit CE, no exit-to-exit KL
        "kd + exit CE + self-distillation": {},
    },
}


# Further variants (not in the default bench: each costs two trainings per seed).
EXTRA_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "digits_aspects": {
        # next to logit KD from the very classifier the aspects are derived from; twin = kd + ce without aspects
        "kd + ce + aspects": {"losses": [_KD, _CE, _ASPECTS], "evaluate.baseline_losses": [_KD, _CE]},
        # the paper's setting again, but the CE twin trains twice as many epochs (is the gain only more steps?)
        "ce + aspects vs a CE twin trained 2x longer": {"evaluate.baseline_epochs": 80},
    },
    "digits_selfdistill": {
        # no cached teacher: the deepest exit learns from the labeled rows only; twin = per-exit CE
        "exit CE + self-distillation (no teacher)": {
            "losses": [{"name": "self_distill", "weight": 1.0, "temperature": 2.0}],
            "evaluate.baseline_losses": [{"name": "self_distill", "kl_weight": 0.0}],
        },
    },
}


def _resolve(value: Any, best: str | None) -> Any:
    if value == BEST_SINGLE:
        if best is None:
            raise ValueError(f"{BEST_SINGLE} needs `teach.fusion` in the spec (its members are the candidates)")
        return best
    return value


def best_single_teacher(cfg: Any, source: Any, taught: dict[str, Any]) -> tuple[str | None, dict[str, float]]:
    """The fusion member with the best accuracy on the validation split (never the test split)."""

    if cfg.teach.fusion is None:
        return None, {}
    members = cfg.teach.fusion.teachers
    val = build_views(source, {t: taught[t].cache for t in members}, cfg.teach.verify).val
    accs = {t: a for t in members if (a := teacher_accuracy_ds(val, t)) is not None}
    return (max(accs, key=accs.__getitem__) if accs else None), accs


def _row_name(variant: str, metric: str, cfg: Any) -> str | None:
    """metric key of a run -> table row label (None: not a row)."""
    m = metric.removeprefix("test_")
    if metric.startswith("teacher_") and metric.endswith("_test_acc"):
        tid = metric.removeprefix("teacher_").removesuffix("_test_acc")
        return f"{variant}: fused teacher" if tid == "fused" else f"teacher {tid}"
    if metric.startswith("test_acc"):
        exit_ = m.removeprefix("acc")
        return f"{variant}" + (f" [exit {exit_.removeprefix('_exit')}]" if exit_ else "")
    if metric.startswith("baseline_test_acc"):
        exit_ = metric.removeprefix("baseline_test_acc")
        twin = "+".join(l["name"] if l.get("kl_weight", 1) else "exit-ce" for l in cfg.evaluate.baseline_losses)
        return f"{variant}: twin ({twin})" + (f" [exit {exit_.removeprefix('_exit')}]" if exit_ else "")
    return None


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def markdown_table(results: dict[str, Any], title: str) -> str:
    rows = results["rows"]
    n = len(results["seeds"])
    lines = [
        f"**{title}** (test accuracy, mean ± sample std (n − 1) over {n} seed{'s' if n != 1 else ''}: {results['seeds']})",
        "",
        "| model | test accuracy |",
        "|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['text']} |")
    return "\n".join(lines)


def compare(
    spec_path: str,
    seeds: list[int],
    overrides: dict[str, Any] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    address: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Run each variant x seed; return (markdown table, results dict with per-seed values and summaries)."""
    overrides = dict(overrides or {})
    base = load_spec(spec_path, overrides)
    variants = variants if variants is not None else VARIANTS.get(base.name, {"spec": {}})
    compare_id = uuid.uuid4().hex[:12]
    t0 = time.time()
    source, uri = prepare(base, address)
    taught = teach(base, source)
    best, member_val = best_single_teacher(base, source, taught)
    per_seed: dict[str, dict[str, list[float]]] = {}
    runs: dict[str, list[str]] = {}
    row_order: list[str] = []
    for label, vover in variants.items():
        resolved = {k: _resolve(v, best) for k, v in vover.items()}
        vname = f"{label} ({best})" if BEST_SINGLE in vover.values() else label
        for seed in seeds:
            # ablations register under "<model>-compare", never in the production model's registry
            cfg = load_spec(
                spec_path,
                {**overrides, **resolved, "seed": seed, "tracking.model_name": f"{base.tracking.model_name}-compare"},
            )
            vt = teach(cfg, source)  # reuses every cache it can; a new fusion mode writes its own `fused` cache
            log.info("compare %s: variant '%s' seed %d", base.name, vname, seed)
            res = distil(
                cfg,
                source,
                vt,
                uri,
                extra_tags={"kdpipe.compare_id": compare_id, "kdpipe.variant": vname, "kdpipe.seed": str(seed)},
            )
            runs.setdefault(vname, []).append(res.run_id)
            exits = any(k.startswith("test_acc_exit") for k in res.metrics)
            for metric, value in res.metrics.items():
                name = _row_name(vname, metric, cfg)
                if name is None or (exits and metric in ("test_acc", "baseline_test_acc")):
                    continue  # a multi-exit student's final output is its deepest exit, listed as such
                if name.startswith("teacher ") and name in per_seed and len(per_seed[name]["values"]) >= len(seeds):
                    continue  # fixed teachers: one value per seed, not per variant
                entry = per_seed.setdefault(name, {"metric": metric, "variant": vname, "values": []})
                entry["values"].append(float(value))
                if name not in row_order:
                    row_order.append(name)
    # teachers first, then the variants in definition order
    order = [n for n in row_order if n.startswith("teacher ")] + [n for n in row_order if not n.startswith("teacher ")]
    rows = {
        n: {
            **per_seed[n],
            "mean": statistics.fmean(per_seed[n]["values"]),
            "std": statistics.stdev(per_seed[n]["values"]) if len(per_seed[n]["values"]) > 1 else 0.0,
            "text": _fmt(per_seed[n]["values"]),
        }
        for n in order
    }
    results = {
        "pipeline": base.name,
        "spec": spec_path,
        "seeds": list(seeds),
        "overrides": overrides,
        "variants": variants,
        "best_single_teacher": best,
        "teacher_val_acc": member_val,
        "rows": rows,
        "runs": runs,
        "compare_id": compare_id,
        "seconds": round(time.time() - t0, 1),
    }
    table = markdown_table(results, base.name)

    client = tracking.client(uri)
    exp_id = ensure_experiment(client, base.tracking.experiment, uri)
    run = client.create_run(
        exp_id,
        run_name=f"{base.name}-compare",
        tags={
            "mlflow.runName": f"{base.name}-compare",
            "kdpipe.compare_id": compare_id,
            "kdpipe.compare_summary": "true",
        },
    )
    try:
        client.log_param(run.info.run_id, "seeds", json.dumps(list(seeds)))
        client.log_param(run.info.run_id, "variants", json.dumps(list(variants))[:6000])
        for i, (name, r) in enumerate(rows.items()):
            key = f"row{i:02d}"
            client.log_metric(run.info.run_id, f"{key}_mean", r["mean"])
            client.log_metric(run.info.run_id, f"{key}_std", r["std"])
            client.set_tag(run.info.run_id, f"kdpipe.{key}", name[:250])
        client.log_text(run.info.run_id, table, "compare.md")
        client.log_text(run.info.run_id, json.dumps(results, indent=2, default=str), "compare.json")
        client.set_terminated(run.info.run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    results["summary_run_id"] = run.info.run_id
    results["tracking_uri"] = uri
    return table, results

"""Each shipped spec exactly as a new user runs it: `kdpipe run pipelines/<spec>.yaml` from an empty
directory, nothing trained or cached beforehand. Records what the README quotes about those runs:

- the wall seconds, and the seconds of each pipeline stage (`bench/stage_timer.py`);
- every MLflow run's final metrics and status, and the registered model's version and aliases;
- what each trained-once teacher reports (`.kdpipe/teachers/*/kdpipe_*.json`: its training
  seconds, held-out accuracy or perplexity, the majority-class or unigram baseline);
- for a fused teacher cache, each member's mean fusion weight over the cached rows;
- the printed results table.

    python bench/pipeline_runs.py [--only digits_kd lm_distill ...]

Writes bench/results/pipeline_runs.json; with `--only`, the specs not run keep their earlier entry.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, fresh_env, results_table, save, short_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = ("digits_kd", "lm_distill", "lm_fusion", "text_classifier_distill")


def run_spec(spec: str, cwd: Path) -> dict[str, Any]:
    """One `kdpipe run` in `cwd` (fresh Ray, fresh MLflow store), timed from outside and per stage."""
    env = {**fresh_env(), "PYTHONPATH": str(ROOT)}
    stages = cwd / "stage_times.json"
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "bench.stage_timer", str(ROOT / "pipelines" / f"{spec}.yaml"), str(stages)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"kdpipe run {spec} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    timing = json.loads(stages.read_text())
    return {
        "wall_s": round(wall, 1),
        **timing,
        "outside_stages_s": round(wall - sum(timing["stages_s"].values()), 1),
        "table": results_table(out.stdout),
        "mlflow": mlflow_record(f"sqlite:///{cwd / 'mlruns.db'}"),
        "teachers": teacher_reports(cwd / ".kdpipe" / "teachers"),
        "fusion_weights": fusion_weights(cwd / ".kdpipe" / "cache" / "fused"),
    }


def mlflow_record(uri: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = [
        {
            "name": r.info.run_name,
            "status": r.info.status,
            "run_id": r.info.run_id,
            "seconds": round((r.info.end_time - r.info.start_time) / 1000, 1) if r.info.end_time else None,
            "metrics": dict(sorted(r.data.metrics.items())),
        }
        for r in client.search_runs(exps, order_by=["attributes.start_time ASC"])
    ]
    models = [
        {
            "name": m.name,
            "aliases": dict(m.aliases),
            "versions": [v.version for v in client.search_model_versions(f"name='{m.name}'")],
        }
        for m in client.search_registered_models()
    ]
    return {"runs": runs, "registered_models": models}


def teacher_reports(root: Path) -> dict[str, Any]:
    """Each trained-once teacher's report, by its directory name (the recipe's digest)."""
    if not root.is_dir():
        return {}
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/kdpipe_*.json"))}


def fusion_weights(root: Path) -> dict[str, Any]:
    """The fused cache's mean weight of each member over its rows (the cache stores one weight per
    member and row); empty where the spec fuses nothing."""
    import pyarrow.dataset as ds

    from kdpipe.arrays import to_numpy

    files = [p for p in root.rglob("*.parquet") if ".staging" not in p.parts] if root.is_dir() else []
    if not files:
        return {}
    w = to_numpy(
        ds.dataset([str(p) for p in files], format="parquet").to_table(columns=["weights"]).column("weights"), "float64"
    )
    return {"rows": int(w.shape[0]), "mean": [round(float(x), 4) for x in w.mean(axis=0)], "files": len(files)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=SPECS, default=list(SPECS))
    args = ap.parse_args(argv)
    path = RESULTS / "pipeline_runs.json"
    specs = json.loads(path.read_text())["specs"] if path.exists() else {}
    commit = short_commit()
    for spec in args.only:
        with tempfile.TemporaryDirectory(prefix=f"kdpipe-{spec}-") as cwd:
            print(f"== kdpipe run pipelines/{spec}.yaml in an empty directory", flush=True)
            specs[spec] = {
                "commit": commit,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **run_spec(spec, Path(cwd)),
            }
            print(f"{specs[spec]['wall_s']} s\n{specs[spec]['table']}", flush=True)
        # after every spec: a later spec that fails keeps what the earlier ones measured
        print(save("pipeline_runs", {"command": "python bench/pipeline_runs.py", "specs": specs}))


if __name__ == "__main__":
    main()

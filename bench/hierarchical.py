"""Hierarchical self-distillation over seeds: every exit of the multi-exit text classifier, with
and without the exit-to-exit KL.

Runs `pipelines/text_classifier_hierarchical.yaml` as the README ships it (a 4-layer
`hf_classifier` with exits after layers 1, 2 and 3, from the fine-tuned MiniLM classifier that
kdpipe trains once) for every seed; the run's twin is the same multi-exit student without the
exit-to-exit KL. Reads back each exit's test accuracy (`test_acc_exit<i>`, `baseline_test_acc_exit<i>`)
and writes bench/results/text_classifier_hierarchical.json.

    python bench/hierarchical.py                 # seeds 0 1 2 (≈ 15 min per seed on 2 cores)

Runs already finished in its MLflow store (.kdpipe/bench-hierarchical) are not run again.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import bench_store, mean_sd, write_table  # noqa: E402

EXPERIMENT = "bench-hierarchical"
SPEC = ROOT / "pipelines" / "text_classifier_hierarchical.yaml"


def collect(
    uri: str, seeds: list[int], exits: int
) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, object]]]:
    """Per exit, the student's and the twin's test accuracies from the finished runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    rows: dict[str, dict[str, list[float]]] = {"teacher": {"student": []}}
    rows.update({f"exit {i}": {"student": [], "twin": []} for i in range(exits)})
    runs: list[dict[str, object]] = []
    if exp is None:
        return rows, runs
    for r in client.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]
    ):
        seed, m = int(r.data.params["seed"]), r.data.metrics
        if seed not in seeds or "test_acc_exit0" not in m:
            continue
        runs.append({"seed": seed, "run_id": r.info.run_id, "metrics": {k: v for k, v in m.items() if "test_acc" in k}})
        rows["teacher"]["student"].append(m["teacher_clf_test_acc"])
        for i in range(exits):
            rows[f"exit {i}"]["student"].append(m[f"test_acc_exit{i}"])
            rows[f"exit {i}"]["twin"].append(m[f"baseline_test_acc_exit{i}"])
    return rows, runs


def table(rows: dict[str, dict[str, list[float]]], depths: list[int], seeds: list[int]) -> str:
    lines = [
        f"**text_classifier_hierarchical** (test glosses, 45 classes; mean ± sample std over seeds {seeds})",
        "",
        "| exit (depth) | with self-distillation | twin without exit-to-exit KL |",
        "|---|---|---|",
        f"| teacher (6 layers) | {mean_sd(rows['teacher']['student'], 4) if rows['teacher']['student'] else ''} | |",
    ]
    for i, depth in enumerate(depths):
        r = rows[f"exit {i}"]
        if r["student"]:
            lines.append(
                f"| exit {i} ({depth} layer{'s' if depth > 1 else ''}) | {mean_sd(r['student'], 4)} | "
                f"{mean_sd(r['twin'], 4)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default=str(ROOT / ".kdpipe" / "bench-hierarchical"))
    ap.add_argument(
        "--teachers",
        default=str(ROOT / ".kdpipe" / "teachers"),
        help="where the fine-tuned teacher lives (shared with `kdpipe run pipelines/text_classifier_*.yaml`)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "text_classifier_hierarchical.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kdpipe").setLevel(logging.INFO)

    from kdpipe.config import load_spec
    from kdpipe.pipeline import distil, prepare, teach

    work = Path(args.work).resolve()
    base = {
        **bench_store(work, EXPERIMENT),
        "teachers.0.params.finetune_root": str(Path(args.teachers).resolve()),
        "tracking.model_name": "text-classifier-hierarchical-bench",
    }
    cfg = load_spec(str(SPEC), base)
    depths = [*cfg.student.params["exits"], cfg.student.params["layers"]]
    t0 = time.time()
    source, uri = prepare(cfg)
    taught = teach(cfg, source)  # the fine-tuned teacher and its cache: built once, reused
    _, runs = collect(uri, args.seeds, len(depths))
    for seed in sorted(set(args.seeds) - {int(r["seed"]) for r in runs}):
        res = distil(load_spec(str(SPEC), {**base, "seed": seed}), source, taught, uri)
        print(
            f"seed {seed}: "
            + ", ".join(
                f"exit {i} {res.metrics[f'test_acc_exit{i}']:.4f} "
                f"(twin {res.metrics[f'baseline_test_acc_exit{i}']:.4f})"
                for i in range(len(depths))
            ),
            flush=True,
        )
    rows, runs = collect(uri, args.seeds, len(depths))
    md = table(rows, depths, sorted({int(r["seed"]) for r in runs}))
    out = {
        "command": "python bench/hierarchical.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seeds": args.seeds,
        "depths": depths,
        "epochs": cfg.train.epochs,
        "rows": rows,
        "runs": runs,
        "table": md,
        "seconds": round(time.time() - t0, 1),
    }
    path = write_table(args.out, out)
    print("\n" + md + f"\n\nwrote {path} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

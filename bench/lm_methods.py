"""Causal-LM distillation results: token-level objectives vs the next-token-CE twin, over seeds.

Runs `pipelines/lm_distill.yaml` as the README ships it (the 4 × 256 Llama teacher pretrained once
on the train glosses, 3,000 glosses, a 2-block student from teacher blocks 0 and 3) with each
objective below (+ `lm_ce`), for every seed; the twin (the same student on `lm_ce` alone, same
epochs) trains once per seed. The teacher and its cache are built once and reused. Held-out
metrics on the test glosses: perplexity, next-token accuracy, top-1 agreement with the teacher,
KL(teacher ‖ student) over the cached top-k + tail buckets. Writes bench/results/lm_methods.json.

    python bench/lm_methods.py                  # 3 seeds, every objective (≈ 1.5 h on 2 cores)
    python bench/lm_methods.py --objectives "forward KL + CE"   # what the README's table ran

Runs already finished in its MLflow store (.kdpipe/bench-lm) are not run again.
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

OBJECTIVES = {
    "forward KL + CE": {"name": "forward_kl", "weight": 1.0},
    "reverse KL + CE": {"name": "reverse_kl", "weight": 1.0},
    "JSD(β=0.5) + CE": {"name": "jsd", "weight": 1.0, "beta": 0.5},
}
METRICS = ("test_ppl", "test_token_acc", "test_teacher_agreement", "test_kl")


def table(rows: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    lines = [
        f"**lm_distill** (test glosses; mean ± sample std over seeds {seeds})",
        "",
        "| model | perplexity ↓ | next-token acc | top-1 agreement with teacher | KL(teacher ‖ model) ↓ |",
        "|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        cells = [mean_sd(m[k], 2 if k == "test_ppl" else 4) if m.get(k) else "—" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(
    uri: str, seeds: list[int], want: dict[str, str]
) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, object]]]:
    """Rows of the table from the finished MLflow runs of this benchmark (so a stopped benchmark
    resumes where it was: `--seeds` / `--objectives` run only what is missing)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-lm")
    label_of = {v["name"]: k for k, v in OBJECTIVES.items()}
    rows: dict[str, dict[str, list[float]]] = {}
    twin: dict[str, list[float]] = {}
    runs = []
    for r in client.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]
    ):
        seed, label = int(r.data.params["seed"]), label_of.get(r.data.params.get("losses.0.name", ""))
        if label is None or seed not in seeds or any(r.data.params.get(k) != v for k, v in want.items()):
            continue  # another objective, seed, or training budget
        m = r.data.metrics
        runs.append(
            {
                "seed": seed,
                "objective": label,
                "run_id": r.info.run_id,
                "metrics": {k: v for k, v in m.items() if "test_" in k},
            }
        )
        for k in METRICS:
            rows.setdefault(label, {}).setdefault(k, []).append(m[k])
            if f"baseline_{k}" in m:
                twin.setdefault(k, []).append(m[f"baseline_{k}"])
        if "teacher" not in rows:
            rows["teacher"] = {"test_ppl": [m["test_teacher_ppl"]], "test_token_acc": [m["test_teacher_token_acc"]]}
    ordered = {"teacher (4 × 256, from its cache)": rows.pop("teacher", {})}
    ordered.update({k: rows[k] for k in OBJECTIVES if k in rows})
    if twin:
        ordered["twin: lm_ce only"] = twin
    return ordered, runs


def done(uri: str, want: dict[str, str]) -> set[tuple[int, str]]:
    _, runs = collect(uri, list(range(1000)), want)
    return {(int(r["seed"]), str(r["objective"])) for r in runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument(
        "--shuffle-buffer",
        type=int,
        default=2000,
        help="train.shuffle_buffer: the student starts from teacher blocks, so without a shuffled, "
        "seeded batch order every seed trains the same model (0 = the spec's fixed order)",
    )
    ap.add_argument("--work", default=str(ROOT / ".kdpipe" / "bench-lm"))
    ap.add_argument(
        "--teachers",
        default=str(ROOT / ".kdpipe" / "teachers"),
        help="where the pretrained teacher lives (shared with `kdpipe run pipelines/lm_distill.yaml`)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_methods.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kdpipe").setLevel(logging.INFO)

    from kdpipe.config import load_spec
    from kdpipe.pipeline import distil, prepare, teach

    work = Path(args.work).resolve()
    base = {
        **bench_store(work, "bench-lm"),
        "teachers.0.params.pretrain_root": str(Path(args.teachers).resolve()),
        "tracking.model_name": "lm-student-compare",
    }
    if args.epochs:
        base["train.epochs"] = args.epochs
    base["train.shuffle_buffer"] = args.shuffle_buffer
    spec = str(ROOT / "pipelines" / "lm_distill.yaml")
    t0 = time.time()
    cfg0 = load_spec(spec, base)
    want = {"train.epochs": str(cfg0.train.epochs), "train.shuffle_buffer": str(cfg0.train.shuffle_buffer)}
    source, uri = prepare(cfg0)
    taught = teach(cfg0, source)  # pretrains the teacher once (reused by digest), caches once
    have = done(uri, want)
    for seed in args.seeds:
        twin_done = any(s == seed for s, _ in have)  # an earlier run of this seed trained its twin
        for label in args.objectives:
            if (seed, label) in have:
                continue
            over = {
                **base,
                "seed": seed,
                "losses": [OBJECTIVES[label], {"name": "lm_ce", "weight": 1.0}],
                "evaluate.baseline": not twin_done,
            }  # the twin does not depend on the objective: once per seed
            twin_done = True
            res = distil(load_spec(spec, over), source, taught, uri)
            print(f"seed {seed} {label}: " + ", ".join(f"{k} {res.metrics[k]:.4f}" for k in METRICS), flush=True)
    rows, runs = collect(uri, args.seeds, want)
    md = table(rows, sorted({int(r["seed"]) for r in runs}))
    out = {
        "command": "python bench/lm_methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seeds": args.seeds,
        "epochs": cfg0.train.epochs,
        "shuffle_buffer": cfg0.train.shuffle_buffer,
        "rows": rows,
        "runs": runs,
        "table": md,
        "seconds": round(time.time() - t0, 1),
    }
    path = write_table(args.out, out, keep_earlier=True)  # rows resume across invocations
    print("\n" + md + f"\n\nwrote {path} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

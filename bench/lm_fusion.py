"""Token-level logit fusion results: two causal-LM experts, their uniform and dynamic fusions, and
a student distilled from each, against the next-token-CE twin.

Runs `pipelines/lm_fusion.yaml` as the README ships it (a noun-gloss and a verb-gloss 4 × 256 Llama,
each pretrained once by kdpipe; 3,000 glosses of every part of speech; a 2-block student), one run
per teacher signal, each with the spec's forward KL + next-token CE:

  * dynamic fusion  — the spec as shipped (`teach.fusion.mode: dynamic`), plus the twin (`lm_ce` alone)
  * uniform fusion  — `teach.fusion.mode: uniform` (the geometric mean of the two experts)
  * noun expert     — no fusion, forward KL against the noun expert's own cache
  * verb expert     — no fusion, forward KL against the verb expert's own cache

A student starts from its teacher's blocks 0 and 3 (the fused students from the noun expert's, as
the spec ships). Held-out metrics on the test glosses: perplexity and next-token accuracy, for
every student and every teacher (a teacher's from its cache: its top-64 + tail). The experts and
their caches are built once and reused. Every metric is also read on the noun and the verb glosses
alone (the spec's `evaluate.slices`), with their geometric mean: a test weighted equally between the
two domains, which the all-gloss test (74 % nouns) is not. Writes bench/results/lm_fusion.json.

    python bench/lm_fusion.py --epochs 1 --seeds 0 1 2
        # ≈ 13 min to pretrain both experts, then ≈ 2–5 min a student (2 cores)

Runs already finished in its MLflow store (.kdpipe/bench-lm-fusion) are not run again.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import bench_store, mean_sd, write_table  # noqa: E402

SIGNALS: dict[str, dict[str, Any]] = {
    "dynamic fusion": {"teach.fusion.mode": "dynamic"},
    "uniform fusion": {"teach.fusion.mode": "uniform"},
    "noun expert": {"teach.fusion": None, "losses.0.teacher": "noun", "student.params.tokens_from": "noun"},
    "verb expert": {"teach.fusion": None, "losses.0.teacher": "verb", "student.params.tokens_from": "verb"},
}
METRICS = ("test_ppl", "test_token_acc")
SLICES = ("nouns", "verbs")  # `evaluate.slices` of pipelines/lm_fusion.yaml
COLUMNS = ("test_ppl", "test_token_acc", "test_nouns_ppl", "test_verbs_ppl", "balanced_ppl")


def with_balanced(m: dict[str, float], key: str) -> dict[str, float]:
    """One model's cells from a run's metrics (`key`: test, baseline_test, test_teacher_noun, …):
    perplexity and accuracy on every test gloss, perplexity on each domain's glosses alone, and the
    geometric mean of the two domains' perplexities (a test weighted equally between the domains)."""

    def at(part: str, metric: str) -> float | None:  # the slice sits after "test": test_nouns_teacher_noun_ppl
        head, _, tail = key.rpartition("test")
        return m.get(f"{head}test_{part}{tail}_{metric}")

    cells = {c: m[f"{key}_{c[5:]}"] for c in METRICS if f"{key}_{c[5:]}" in m}
    domains = [at(s, "ppl") for s in SLICES]
    if all(d is not None for d in domains):
        cells.update({f"test_{s}_ppl": d for s, d in zip(SLICES, domains)})
        cells["balanced_ppl"] = (domains[0] * domains[1]) ** 0.5
    return cells


def add(rows: dict[str, dict[str, list[float]]], name: str, m: dict[str, float], key: str) -> None:
    """Append one run's cells of model `name` (its metrics under `key`) to the table's rows."""
    for c, v in with_balanced(m, key).items():
        rows.setdefault(name, {}).setdefault(c, []).append(v)


def table(rows: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    spread = "one seed" if len(seeds) == 1 else "mean ± sample std"
    lines = [
        f"**lm_fusion** (test glosses; {spread}: seeds {seeds})",
        "",
        "| model | perplexity ↓ (all) | next-token acc (all) | perplexity: noun glosses | perplexity: verb glosses "
        "| perplexity: both domains weighted equally (geometric mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        if m.get("test_ppl"):
            cells = [mean_sd(m[c], 4 if c.endswith("acc") else 1) if m.get(c) else "–" for c in COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(params: dict[str, str]) -> str | None:
    if params.get("losses.0.teacher") in ("noun", "verb"):
        return f"{params['losses.0.teacher']} expert"
    mode = params.get("teach.fusion.mode")
    return f"{mode} fusion" if mode in ("dynamic", "uniform") else None


def collect(
    uri: str, seeds: list[int], want: dict[str, str]
) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, Any]]]:
    """Rows of the table from the finished runs of this benchmark (a stopped run resumes)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-lm-fusion")
    teachers: dict[str, dict[str, list[float]]] = {}
    students: dict[str, dict[str, list[float]]] = {}
    runs: list[dict[str, Any]] = []
    if exp is None:
        return {}, runs
    for r in client.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]
    ):
        p, m = r.data.params, r.data.metrics
        label, seed = _label(p), int(p["seed"])
        if label is None or seed not in seeds or any(p.get(k) != v for k, v in want.items()):
            continue
        runs.append(
            {
                "seed": seed,
                "signal": label,
                "run_id": r.info.run_id,
                "metrics": {k: v for k, v in m.items() if "test_" in k},
            }
        )
        add(students, f"student ← {label}", m, "test")
        if "baseline_test_ppl" in m:
            add(students, "twin: `lm_ce` only", m, "baseline_test")
        if label.endswith("fusion"):  # the fused teacher of this run; the experts from the dynamic run (once a seed)
            add(teachers, f"teacher: {label}", m, "test_teacher")
            if label == "dynamic fusion":
                add(teachers, "teacher: noun expert", m, "test_teacher_noun")
                add(teachers, "teacher: verb expert", m, "test_teacher_verb")
    order = ["teacher: noun expert", "teacher: verb expert", "teacher: uniform fusion", "teacher: dynamic fusion"]
    rows = {k: teachers[k] for k in order if k in teachers}
    rows.update({f"student ← {s}": students[f"student ← {s}"] for s in SIGNALS if f"student ← {s}" in students})
    if "twin: `lm_ce` only" in students:
        rows["twin: `lm_ce` only"] = students["twin: `lm_ce` only"]
    return rows, runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--signals", nargs="+", choices=list(SIGNALS), default=list(SIGNALS))
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    ap.add_argument("--shuffle-buffer", type=int, default=2000, help="train.shuffle_buffer (as bench/lm_methods.py)")
    ap.add_argument("--work", default=str(ROOT / ".kdpipe" / "bench-lm-fusion"))
    ap.add_argument(
        "--teachers",
        default=str(ROOT / ".kdpipe" / "teachers"),
        help="where the pretrained experts live (shared with `kdpipe run pipelines/lm_fusion.yaml`)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm_fusion.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kdpipe").setLevel(logging.INFO)

    from kdpipe.config import load_spec
    from kdpipe.pipeline import distil, prepare, teach

    work = Path(args.work).resolve()
    teachers_root = str(Path(args.teachers).resolve())
    base = {
        **bench_store(work, "bench-lm-fusion"),
        "teachers.0.params.pretrain_root": teachers_root,
        "teachers.1.params.pretrain_root": teachers_root,
        "tracking.model_name": "lm-fusion-student-compare",
        "train.shuffle_buffer": args.shuffle_buffer,
    }
    if args.epochs:
        base["train.epochs"] = args.epochs
    spec = str(ROOT / "pipelines" / "lm_fusion.yaml")
    t0 = time.time()
    cfg0 = load_spec(spec, base)
    want = {"train.epochs": str(cfg0.train.epochs), "train.shuffle_buffer": str(cfg0.train.shuffle_buffer)}
    source, uri = prepare(cfg0)
    _, runs = collect(uri, args.seeds, want)
    have = {(int(r["seed"]), str(r["signal"])) for r in runs}
    for seed in args.seeds:
        for label in args.signals:
            if (seed, label) in have:
                continue
            cfg = load_spec(
                spec, {**base, **SIGNALS[label], "seed": seed, "evaluate.baseline": label == "dynamic fusion"}
            )  # one twin per seed
            taught = teach(cfg, source)  # the experts pretrain and teach once; each fusion mode fuses once
            res = distil(cfg, source, taught, uri)
            print(f"seed {seed} {label}: " + ", ".join(f"{k} {res.metrics[k]:.4f}" for k in METRICS), flush=True)
    rows, runs = collect(uri, args.seeds, want)
    md = table(rows, sorted({int(r["seed"]) for r in runs}))
    out = {
        "command": "python bench/lm_fusion.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seeds": args.seeds,
        "epochs": cfg0.train.epochs,
        "shuffle_buffer": cfg0.train.shuffle_buffer,
        "rows": rows,
        "runs": runs,
        "table": md,
        "seconds": round(time.time() - t0, 1),
    }
    path = write_table(args.out, out, keep_earlier=True)
    print("\n" + md + f"\n\nwrote {path} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Text-classifier distillation results over seeds: the KD student, its labels-only twin, and the
"Well-Read Students" recipe (distil a general encoder first, then distil the task into it).

Runs `pipelines/text_classifier_distill.yaml` as the README ships it (the MiniLM classifier that
kdpipe fine-tunes once on the train glosses, 6,000 glosses, 45 WordNet categories, a 2-layer
student) for every seed:
  * KD student:   KD + CE + hidden-state MSE + MiniLM relations, from teacher layers 0 and 5
  * twin:         the same student fine-tuned on the labels alone (CE), same epochs
  * Well-Read:    stage 1 distils a 2-layer encoder from all-MiniLM-L6-v2 on the glosses
                  (`pipelines/minilm_distill.yaml`: embedding cosine + hidden MSE + MiniLM, no
                  labels); stage 2 starts the classifier's encoder from it (`init_from`) and
                  trains with the KD student's losses
Held-out metrics on the test glosses: accuracy and macro-F1. The teacher and its caches are built
once and reused. Writes bench/results/text_classifier.json.

    python bench/text_classifier.py               # 3 seeds (≈ 45 min on 2 cores after the teacher)
    python bench/text_classifier.py --no-well-read --labeled-fraction 0.1
        # KD's own setting: labels on 10 % of the train glosses, the teacher's outputs on all of them;
        # the twin trains on the labeled 10 % (writes bench/results/text_classifier_labeled_0.1.json)

Runs already finished in its MLflow store (.kdpipe/bench-text-classifier) are not run again.
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

METRICS = ("test_acc", "test_macro_f1")
ROWS = ("KD student", "twin: labels only", "Well-Read: distilled encoder, then KD")


def table(rows: dict[str, dict[str, list[float]]], seeds: list[int], labeled: float = 1.0) -> str:
    setting = "" if labeled == 1.0 else f", labels on {labeled:.0%} of the train glosses"
    lines = [
        f"**text_classifier_distill** (test glosses, 45 classes{setting}; mean ± sample std over seeds {seeds})",
        "",
        "| model | accuracy | macro-F1 | runs |",
        "|---|---|---|---|",
    ]
    for name, m in rows.items():
        if m.get("test_acc"):
            lines.append(
                f"| {name} | {mean_sd(m['test_acc'], 4)} | {mean_sd(m['test_macro_f1'], 4)} | {len(m['test_acc'])} |"
            )
    return "\n".join(lines)


def collect(
    uri: str, seeds: list[int], labeled: float = 1.0
) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, object]]]:
    """The table's rows from the finished runs of this benchmark's MLflow experiment (those with
    `labeled` as their source's labeled fraction)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench-text-classifier")
    rows: dict[str, dict[str, list[float]]] = {"teacher (6 layers, from its cache)": {}}
    rows.update({r: {} for r in ROWS})
    runs: list[dict[str, object]] = []
    if exp is None:
        return rows, runs
    for r in client.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time ASC"]
    ):
        seed, m = int(r.data.params["seed"]), r.data.metrics
        if seed not in seeds or "test_acc" not in m:
            continue
        if float(r.data.params.get("source.split.labeled_fraction", 1.0)) != labeled:
            continue
        label = ROWS[2] if r.data.params.get("student.params.init_from") not in (None, "None", "null", "") else ROWS[0]
        runs.append(
            {
                "seed": seed,
                "row": label,
                "run_id": r.info.run_id,
                "metrics": {k: v for k, v in m.items() if "test_" in k},
            }
        )
        for k in METRICS:
            rows[label].setdefault(k, []).append(m[k])
            if label == ROWS[0] and f"baseline_{k}" in m:
                rows[ROWS[1]].setdefault(k, []).append(m[f"baseline_{k}"])
        t = rows["teacher (6 layers, from its cache)"]
        if label == ROWS[0] and "teacher_clf_test_acc" in m:
            t.setdefault("test_acc", []).append(m["teacher_clf_test_acc"])
            t.setdefault("test_macro_f1", []).append(m["teacher_clf_test_macro_f1"])
    return rows, runs


def encoder_dir(uri: str, name: str, version: str, dst: Path) -> str:
    """The registered stage-1 encoder as a local Hugging Face directory."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst)))
    return str(local / "model")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default=str(ROOT / ".kdpipe" / "bench-text-classifier"))
    ap.add_argument(
        "--teachers",
        default=str(ROOT / ".kdpipe" / "teachers"),
        help="where the fine-tuned teacher lives (shared with `kdpipe run pipelines/text_classifier_distill.yaml`)",
    )
    ap.add_argument("--no-well-read", action="store_true", help="skip the two-stage Well-Read rows")
    ap.add_argument(
        "--labeled-fraction",
        type=float,
        default=1.0,
        help="source.split.labeled_fraction: the share of train glosses whose labels the students see",
    )
    ap.add_argument(
        "--out",
        help="default bench/results/text_classifier.json "
        "(text_classifier_labeled_<f>.json below a labeled fraction of 1)",
    )
    args = ap.parse_args(argv)
    if args.out is None:
        suffix = "" if args.labeled_fraction == 1.0 else f"_labeled_{args.labeled_fraction:g}"
        args.out = str(ROOT / "bench" / "results" / f"text_classifier{suffix}.json")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kdpipe").setLevel(logging.INFO)

    from kdpipe.config import load_spec
    from kdpipe.pipeline import distil, prepare, teach

    work = Path(args.work).resolve()
    common = bench_store(work, "bench-text-classifier")
    clf_spec, enc_spec = (
        str(ROOT / "pipelines" / "text_classifier_distill.yaml"),
        str(ROOT / "pipelines" / "minilm_distill.yaml"),
    )
    clf_base = {
        **common,
        "teachers.0.params.finetune_root": str(Path(args.teachers).resolve()),
        "tracking.model_name": "text-classifier-compare",
        "source.split.labeled_fraction": args.labeled_fraction,
    }
    clf0 = load_spec(clf_spec, clf_base)
    # stage 1 of Well-Read: the classifier student's shape, distilled from the general encoder on the same glosses
    enc_base = {
        **common,
        "source.limit": clf0.source.limit,
        "source.split": clf0.source.split.model_dump(),
        "tracking.experiment": "bench-text-classifier-encoders",
        "tracking.model_name": "well-read-encoder",
        "evaluate.baseline": False,
        "student.params.layers": clf0.student.params["layers"],
        "student.params.init_from_teacher": clf0.student.params["init_from_teacher"],
        "losses.1.layer_map": {1: 3, 2: 6},
        "train.epochs": clf0.train.epochs,
        "train.shuffle_buffer": 2000,
    }
    t0 = time.time()
    source, uri = prepare(clf0)
    taught = teach(clf0, source)  # fine-tunes the teacher once (reused by digest), caches once
    _, runs = collect(uri, args.seeds, args.labeled_fraction)
    have = {(int(r["seed"]), r["row"]) for r in runs}
    enc_taught = None
    for seed in args.seeds:
        if (seed, ROWS[0]) not in have:
            res = distil(load_spec(clf_spec, {**clf_base, "seed": seed}), source, taught, uri)
            print(
                f"seed {seed} KD: acc {res.metrics['test_acc']:.4f}, twin {res.metrics['baseline_test_acc']:.4f}",
                flush=True,
            )
        if args.no_well_read or (seed, ROWS[2]) in have:
            continue
        enc_cfg = load_spec(enc_spec, {**enc_base, "seed": seed})
        if enc_taught is None:
            enc_source, _ = prepare(enc_cfg)
            enc_taught = teach(enc_cfg, enc_source)
        stage1 = distil(enc_cfg, enc_source, enc_taught, uri)
        init = encoder_dir(uri, "well-read-encoder", stage1.model_version, work / "encoders" / f"seed{seed}")
        wr = load_spec(
            clf_spec,
            {
                **clf_base,
                "seed": seed,
                "student.params.init_from": init,
                "student.params.init_from_teacher": None,
                "evaluate.baseline": False,
            },
        )
        res = distil(wr, source, taught, uri)
        print(
            f"seed {seed} Well-Read: acc {res.metrics['test_acc']:.4f} (stage-1 cosine "
            f"{stage1.metrics['test_cosine']:.4f})",
            flush=True,
        )
    rows, runs = collect(uri, args.seeds, args.labeled_fraction)
    md = table(rows, sorted({int(r["seed"]) for r in runs}), args.labeled_fraction)
    out = {
        "command": "python bench/text_classifier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seeds": args.seeds,
        "labeled_fraction": args.labeled_fraction,
        "epochs": clf0.train.epochs,
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

"""Dynamic logit fusion, multi-aspect KD and multi-exit self-distillation vs their baselines.

Runs `kdpipe.compare.compare` for pipelines/digits_{fusion,aspects,selfdistill}.yaml over several
student seeds on one embedded Ray, writes bench/results/methods.json and prints the markdown tables.
Everything it writes (teachers, caches, Ray results, MLflow store) stays under .kdpipe/bench/.

    python bench/compare_methods.py                 # 3 seeds, all three pipelines
    python bench/compare_methods.py --seeds 0 1 2 3 --only digits_fusion
    python bench/compare_methods.py --only digits_aspects --extra   # kdpipe.compare.EXTRA_VARIANTS instead
                                                                     # -> bench/results/methods_extra.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PIPELINES = ["digits_fusion", "digits_aspects", "digits_selfdistill"]


def bench_overrides(name: str, work: Path, epochs: int | None) -> dict[str, object]:
    """Keep every output of the benchmark under `work`; optionally shorten student training."""
    o: dict[str, object] = {
        "storage": str(work),
        "tracking.tracking_uri": f"sqlite:///{work / 'mlruns.db'}",
        "tracking.experiment": f"bench-{name}",
    }
    from kdpipe.config import load_spec

    cfg = load_spec(ROOT / "pipelines" / f"{name}.yaml")
    for i, t in enumerate(cfg.teachers):
        if t.path:
            o[f"teachers.{i}.path"] = str(work / "teachers" / Path(t.path).name)
    if epochs is not None:
        o["train.epochs"] = epochs
    return o


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", choices=PIPELINES, default=PIPELINES)
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs of every pipeline")
    ap.add_argument("--work", default=str(ROOT / ".kdpipe" / "bench"), help="where teachers, caches and MLflow go")
    ap.add_argument(
        "--extra", action="store_true", help="run kdpipe.compare.EXTRA_VARIANTS instead of the default variants"
    )
    ap.add_argument("--out", default=None, help="default bench/results/methods.json (methods_extra.json with --extra)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    from kdpipe.compare import EXTRA_VARIANTS, compare

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out: dict[str, object] = {
        "seeds": args.seeds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "python bench/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "pipelines": {},
    }
    tables = []
    for name in args.only:
        spec = str(ROOT / "pipelines" / f"{name}.yaml")
        variants = EXTRA_VARIANTS.get(name, {}) if args.extra else None
        if variants == {}:
            continue
        table, res = compare(spec, args.seeds, bench_overrides(name, work, args.epochs), variants)
        out["pipelines"][name] = res  # type: ignore[index]
        tables.append(table)
        print(
            "\n" + table + f"\n\n({name}: {res['seconds']} s; summary MLflow run {res['summary_run_id']})\n", flush=True
        )
    out["seconds"] = round(time.time() - t0, 1)
    out["tables"] = tables
    path = Path(args.out or ROOT / "bench" / "results" / ("methods_extra.json" if args.extra else "methods.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    tmp.replace(path)
    print("\n\n".join(tables))
    print(f"\nwrote {path} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

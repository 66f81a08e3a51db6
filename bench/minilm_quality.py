"""The MiniLM quality tables of the README and the cache size per row, from the shipped specs.

Runs `pipelines/minilm_distill.yaml` (a 3-layer student from teacher layers 0, 2, 5 against its
random-init twin) and `pipelines/minilm_m2mkd.yaml` (m2mKD modules, then end to end, against a twin
of equal compute) as the README ships them, seed 0, and writes their held-out metrics (embedding
cosine to the teacher, recall@10 of the teacher's neighbours, category kNN accuracy; the student's,
the twin's and the teacher's) and each teacher cache's Parquet bytes per row to
bench/results/minilm_quality.json. `--narrow` adds `pipelines/minilm_narrow.yaml`; `--only` runs
the named specs alone (give `--out` another file then, so the other table stays).

    python bench/minilm_quality.py            # ≈ 12 min on 2 cores (MiniLM teaching included)
    python bench/minilm_quality.py --only narrow --out bench/results/minilm_narrow.json
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

from bench.common import bench_store, write_table  # noqa: E402

SPECS = {"distil": "minilm_distill.yaml", "m2mkd": "minilm_m2mkd.yaml", "narrow": "minilm_narrow.yaml"}
METRICS = ("test_cosine", "test_recall10", "test_knn_acc")


def cache_kb_per_row(cache: Any) -> float:
    """Parquet bytes on disk per cached row (every part the manifest names)."""
    files = cache.files(verify=False)
    rows = sum(p["rows"] for p in cache.manifest()["parts"])
    return sum(Path(f).stat().st_size for f in files) / rows / 1000


def run_spec(spec: str, work: Path) -> dict[str, Any]:
    from kdpipe.config import load_spec
    from kdpipe.pipeline import run

    t0 = time.time()
    res = run(load_spec(str(ROOT / "pipelines" / spec), bench_store(work, "bench-minilm-quality")))
    m = res.metrics
    return {
        "spec": f"pipelines/{spec}",
        "run_id": res.run_id,
        "seconds": round(time.time() - t0, 1),
        "student": {k: m[k] for k in METRICS if k in m},
        "twin": {k: m[f"baseline_{k}"] for k in METRICS if f"baseline_{k}" in m},
        "teacher": {k: v for k, v in m.items() if k.startswith("test_teacher")},
        "cache_kb_per_row": {tid: round(cache_kb_per_row(t.cache), 1) for tid, t in res.teach.items()},
        "promoted": res.promoted,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| spec | model | test_cosine | recall@10 | kNN acc |", "|---|---|---|---|---|"]
    for r in results.values():
        for who in ("student", "twin"):
            c = r[who]
            if c:
                lines.append(f"| `{r['spec']}` | {who} | " + " | ".join(f"{c[k]:.3f}" for k in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--narrow", action="store_true", help="also run pipelines/minilm_narrow.yaml")
    ap.add_argument("--only", nargs="+", choices=sorted(SPECS), help="run only these specs")
    ap.add_argument("--work", default=str(ROOT / ".kdpipe" / "bench-minilm-quality"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "minilm_quality.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kdpipe").setLevel(logging.INFO)
    names = args.only or ["distil", "m2mkd"] + (["narrow"] if args.narrow else [])
    results = {n: run_spec(SPECS[n], Path(args.work).resolve()) for n in names}
    md = table(results)
    out = {
        "command": "python bench/minilm_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": results,
        "table": md,
    }
    path = write_table(args.out, out)
    print("\n" + md + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

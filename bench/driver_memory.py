"""Driver memory of a full `kdpipe run` (index, teach, distil, evaluate, register) at N and 10·N
rows: the peak RSS of the `kdpipe` process alone (not its Ray workers), sampled with psutil.

A pipeline that streams keeps the driver flat: rows live in files, the object store and the
workers; the driver holds metrics and weights. Two workloads:
  digits   the default pipeline on a digits-shaped Parquet source (64 floats a row), N = 100,000
  minilm   pipelines/minilm_distill.yaml on WordNet glosses (≈95 KB of cached outputs a row), 2,000 and 20,000

Each run is short (1 epoch, small teacher fit) because memory, not accuracy, is measured.
`python bench/driver_memory.py [--digits N] [--minilm N] [--only digits|minilm]` writes
bench/results/driver_memory.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import digits_parquet, save  # noqa: E402


def peak_rss(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Run `cmd`, sampling its own RSS every 50 ms; (peak MB, seconds, output tail)."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(lines[-40:])}")
    return {"peak_rss_mb": peak / 2**20, "seconds": round(time.time() - t0, 1), "tail": "".join(lines[-12:])}


def _kdpipe(spec: str, tmp: Path, overrides: dict[str, Any]) -> list[str]:
    o = {
        "storage": str(tmp),
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
        "train.epochs": 1,
        "train.checkpoint_every": 1,
        **overrides,
    }
    args = [sys.executable, "-m", "kdpipe.cli", "run", spec]
    for k, v in o.items():
        args += ["--set", f"{k}={v}"]
    return args


def digits_run(rows: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="kd-drvmem-"))
    data = digits_parquet(tmp / "rows.parquet", rows)
    res = peak_rss(
        _kdpipe(
            "pipelines/digits_kd.yaml",
            tmp,
            {
                "source": f'{{"kind": "parquet", "path": "{data}", "features": "x", "label": "label", '
                '"split": {"val": 0.15, "test": 0.25, "labeled_fraction": 0.1}}',
                "teachers.0.path": str(tmp / "teacher"),
                "teachers.0.params.epochs": 2,
                "teachers.0.params.fit_rows": 20000,
                "teach.batch_size": 4096,
                "train.batch_size": 1024,
                "evaluate.baseline_epochs": 1,
            },
        ),
        ROOT,
    )
    return {"rows": rows, "source_mb": data.stat().st_size / 2**20, **res}


def minilm_run(rows: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="kd-drvmem-"))
    res = peak_rss(
        _kdpipe("pipelines/minilm_distill.yaml", tmp, {"source.limit": rows, "evaluate.baseline": False}), ROOT
    )
    cache = sum(f.stat().st_size for f in (tmp / "cache").rglob("*.parquet"))
    return {"rows": rows, "cache_mb": cache / 2**20, **res}


def main(digits: int = 100_000, minilm: int = 2_000, only: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    path = ROOT / "bench" / "results" / "driver_memory.json"
    if path.exists():  # keep the other workload's numbers when only one is re-run
        import json

        out = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("machine", "when")}
    if only in (None, "digits"):
        small, large = digits_run(digits), digits_run(10 * digits)
        out.update(
            digits_rows_small=small["rows"],
            digits_rows_large=large["rows"],
            digits_rss_small_mb=small["peak_rss_mb"],
            digits_rss_large_mb=large["peak_rss_mb"],
            digits_rss_growth=large["peak_rss_mb"] / small["peak_rss_mb"],
            digits_seconds=[small["seconds"], large["seconds"]],
        )
        print(
            f"digits: {small['rows']} rows -> driver peak {small['peak_rss_mb']:.0f} MB; {large['rows']} rows -> "
            f"{large['peak_rss_mb']:.0f} MB (x{out['digits_rss_growth']:.2f})"
        )
        save("driver_memory", out)  # each workload's numbers are kept even if the next one fails
    if only in (None, "minilm"):
        small, large = minilm_run(minilm), minilm_run(10 * minilm)
        out.update(
            minilm_rows_small=small["rows"],
            minilm_rows_large=large["rows"],
            minilm_rss_small_mb=small["peak_rss_mb"],
            minilm_rss_large_mb=large["peak_rss_mb"],
            minilm_rss_growth=large["peak_rss_mb"] / small["peak_rss_mb"],
            minilm_cache_mb=[small["cache_mb"], large["cache_mb"]],
            minilm_seconds=[small["seconds"], large["seconds"]],
        )
        print(
            f"minilm: {small['rows']} rows -> driver peak {small['peak_rss_mb']:.0f} MB; {large['rows']} rows -> "
            f"{large['peak_rss_mb']:.0f} MB (x{out['minilm_rss_growth']:.2f}); cache {large['cache_mb']:.0f} MB"
        )
    save("driver_memory", out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", type=int, default=100_000)
    ap.add_argument("--minilm", type=int, default=2_000)
    ap.add_argument("--only", choices=["digits", "minilm"])
    a = ap.parse_args()
    main(a.digits, a.minilm, a.only)

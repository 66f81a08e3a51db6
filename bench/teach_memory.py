"""Memory of the teach stage for N and 10·N rows of a Parquet source on disk: peak RSS of the
driver (load_source + teach_one) and of the teacher actor processes, each size in a fresh process
with its own Ray, sampled with psutil. Streaming means neither grows with the rows: the driver
holds the row index (id, label, split, position: tens of bytes a row), never the inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import save

CHILD = r"""
import json, sys, tempfile, threading, time, resource
from pathlib import Path
import psutil
rows, data = int(sys.argv[1]), Path(sys.argv[2])
from bench.common import big_digits_teacher
from kdpipe.config import parse_spec
from kdpipe.runtime import init_ray
from kdpipe.data import load_source
from kdpipe.teach import teach_one
tmp = Path(tempfile.mkdtemp(prefix="kdmem-"))
big_digits_teacher(tmp / "t", [256])
init_ray()
me = psutil.Process()
peak = {"actors": 0, "driver": 0}
stop = False
def sample():
    while not stop:
        actors = 0
        for p in psutil.process_iter(["cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "TeacherActor" in cmd or "MapWorker" in cmd:
                actors += p.info["memory_info"].rss
        peak["actors"] = max(peak["actors"], actors)
        peak["driver"] = max(peak["driver"], me.memory_info().rss)
        time.sleep(0.05)
th = threading.Thread(target=sample, daemon=True); th.start()
cfg = parse_spec({"name": "m", "source": {"kind": "parquet", "path": str(data), "features": "x", "label": "label"},
    "teachers": [{"id": "t", "kind": "mlp_classifier", "path": str(tmp / "t"), "outputs": ["logits", "topk"], "topk": 4}],
    "storage": str(tmp / "c"), "teach": {"batch_size": 1024}, "student": {"kind": "mlp"}, "losses": [{"name": "kd"}],
    "tracking": {"model_name": "m"}})
base = me.memory_info().rss
src = load_source(cfg.source, tmp / "q")
r = teach_one(cfg, cfg.teachers[0], src)
assert r.rows_taught == rows
stop = True; th.join()
print(json.dumps({"rows": rows, "driver_rss_before_teach_mb": base / 2**20, "driver_peak_rss_mb": peak["driver"] / 2**20,
                  "actors_peak_rss_mb": peak["actors"] / 2**20, "input_file_mb": data.stat().st_size / 2**20,
                  "index_mb": Path(src.index_path).stat().st_size / 2**20}))
"""


def run(rows: int) -> dict:
    """The data file is written here, so the measured process starts clean."""
    import tempfile

    from bench.common import digits_parquet

    data = digits_parquet(Path(tempfile.mkdtemp(prefix="kdmem-data-")) / "rows.parquet", rows)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(rows), str(data)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(n: int = 50_000) -> dict:
    small, big = run(n), run(10 * n)
    res = {
        "small": small,
        "large": big,
        "actor_peak_ratio_10x_rows": big["actors_peak_rss_mb"] / max(small["actors_peak_rss_mb"], 1e-9),
        "driver_peak_ratio_10x_rows": big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"],
        "driver_growth_bytes_per_extra_row": (big["driver_peak_rss_mb"] - small["driver_peak_rss_mb"])
        * 2**20
        / (big["rows"] - small["rows"]),
    }
    save("teach_memory", res)
    for k in ("small", "large"):
        r = res[k]
        print(
            f"{r['rows']:>8} rows: teacher actor peak RSS {r['actors_peak_rss_mb']:.0f} MB, driver peak {r['driver_peak_rss_mb']:.0f} MB "
            f"(input file {r['input_file_mb']:.0f} MB, row index {r['index_mb']:.0f} MB)"
        )
    print(
        f"10x rows -> actor peak x{res['actor_peak_ratio_10x_rows']:.2f}, driver peak x{res['driver_peak_ratio_10x_rows']:.2f} "
        f"({res['driver_growth_bytes_per_extra_row']:.0f} B per extra row: the row index)"
    )
    return res


if __name__ == "__main__":
    main()

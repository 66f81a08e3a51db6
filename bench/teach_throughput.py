"""Teach stage throughput: kdpipe's Ray Data actor-pool stage vs a plain single-process PyTorch
loop, same teacher, same Parquet source file, same cache output (Parquet with the same columns),
measured side by side in one run; plus rows/s against this CPU's measured fp32 matmul peak
(teacher FLOPs per row / peak).

kdpipe's time is split in two: `load_source` (one streaming pass that validates every row and
hashes its id: what makes caches reusable and appends incremental) and `teach_one` (the Ray Data
stage: read, teacher forward, Parquet write, row check, checksums, manifest)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.common import best_of, big_digits_teacher, digits_parquet, matmul_peak_gflops, save


def main(
    sizes: tuple[int, int] = (100_000, 600_000), hidden: tuple[int, ...] = (2048, 2048), batch: int = 4096
) -> dict:
    import ray

    from kdpipe.runtime import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="kdbench-"))
    net = big_digits_teacher(tmp / "teacher", list(hidden)).eval()
    flops_row = 2 * sum(a * b for a, b in zip([64, *hidden], [*hidden, 10]))
    peak = matmul_peak_gflops()
    limit = peak * 1e9 / flops_row
    init_ray()
    cpus = int(ray.cluster_resources()["CPU"])
    runs = {}
    for n in sizes:
        data = digits_parquet(tmp / f"data{n}" / "rows.parquet", n)
        t_plain = best_of(lambda: _plain_loop(net, data, batch, tmp / "plain.parquet"), 2)
        # one actor with every CPU; at the small size also one actor per CPU (how the pool scales here)
        configs = [(1, float(cpus))] + ([(cpus, 1.0)] if n == sizes[0] and cpus > 1 else [])
        stage, t_load = {}, []
        for conc, ncpu in configs:
            times = []
            for rep in range(2):
                t_idx, t_teach = _kdpipe(tmp, data, n, conc, ncpu, batch, f"{n}-{conc}-{rep}")
                t_load.append(t_idx)
                times.append(t_teach)
            stage[f"actors={conc}x{ncpu:g}cpu"] = min(times)
        runs[n] = {"plain_loop_s": t_plain, "teach_stage_s": stage, "load_source_s": min(t_load)}
        print(
            f"{n:>8} rows: plain loop {t_plain:.1f} s, kdpipe load_source {min(t_load):.1f} s + teach_one "
            + ", ".join(f"{k} {v:.1f} s" for k, v in stage.items())
        )
    n1, n2 = sizes
    key = f"actors=1x{cpus:g}cpu"
    # t = fixed + rows / rate, from the two sizes (start-up costs cancel in the difference)
    plain_rate = (n2 - n1) / (runs[n2]["plain_loop_s"] - runs[n1]["plain_loop_s"])
    ray_rate = (n2 - n1) / (runs[n2]["teach_stage_s"][key] - runs[n1]["teach_stage_s"][key])
    ray_fixed = runs[n1]["teach_stage_s"][key] - n1 / ray_rate
    out = {
        "sizes": list(sizes),
        "teacher_hidden": list(hidden),
        "batch_size": batch,
        "runs": runs,
        "end_to_end_vs_plain": {n: runs[n]["plain_loop_s"] / runs[n]["teach_stage_s"][key] for n in sizes},
        "end_to_end_with_load_source_vs_plain": {
            n: runs[n]["plain_loop_s"] / (runs[n]["teach_stage_s"][key] + runs[n]["load_source_s"]) for n in sizes
        },
        "steady_rows_per_s": {"plain": plain_rate, "kdpipe": ray_rate},
        "steady_state_vs_plain": ray_rate / plain_rate,
        "kdpipe_fixed_cost_s": ray_fixed,
        "teacher_gflop_per_row": flops_row / 1e9,
        "matmul_peak_gflops": peak,
        "physical_limit_rows_per_s": limit,
        "plain_fraction_of_limit": plain_rate / limit,
        "kdpipe_fraction_of_limit": ray_rate / limit,
        "note": "plain loop: read Parquet, forward, write logits+top-k Parquet in one warm process (teacher already "
        "in memory). teach_one: Ray Data read + actor pool (process start, teacher load) + Parquet write + "
        "exactly-once row check + sha256 + manifest, Ray already started. load_source: validation and "
        "content-hash ids of every row (one streaming pass). Steady state and fixed cost are fitted from the "
        "two sizes: t = fixed + rows / rate.",
    }
    save("teach_throughput", out)
    print(
        f"steady state: plain {plain_rate:,.0f} rows/s, kdpipe {ray_rate:,.0f} rows/s -> {ray_rate / plain_rate:.2f}x; "
        f"kdpipe fixed cost {ray_fixed:.1f} s (Ray Data actor pool start, teacher load, commit); end to end "
        + ", ".join(f"{n} rows {v:.2f}x" for n, v in out["end_to_end_vs_plain"].items())
        + f"; physical limit {limit:,.0f} rows/s (matmul peak {peak:.0f} GFLOP/s)"
    )
    return out


def _plain_loop(net: torch.nn.Module, data: Path, batch: int, out: Path) -> None:
    """What a user would write: one process reads the rows, runs the teacher, writes its outputs."""
    from kdpipe.arrays import to_numpy
    from kdpipe.teach import output_columns

    with torch.no_grad(), pq.ParquetWriter(out, _out_schema()) as w:
        for b in pq.ParquetFile(data).iter_batches(batch_size=batch, columns=["x"]):
            x = to_numpy(b.column("x"), np.float32)
            cols = output_columns({"logits": net(torch.from_numpy(x)).numpy()}, ["logits", "topk"], 4)
            w.write_table(pa.table({"id": pa.array(np.arange(len(x)).astype(str)), **cols}))


def _kdpipe(tmp: Path, data: Path, n: int, conc: int, ncpu: float, batch: int, tag: str) -> tuple[float, float]:
    from kdpipe.config import parse_spec
    from kdpipe.data import load_source
    from kdpipe.teach import teach_one

    cfg = parse_spec(
        {
            "name": "bench",
            "source": {"kind": "parquet", "path": str(data), "features": "x", "label": "label"},
            "teachers": [
                {
                    "id": "big",
                    "kind": "mlp_classifier",
                    "path": str(tmp / "teacher"),
                    "outputs": ["logits", "topk"],
                    "topk": 4,
                }
            ],
            "storage": str(tmp / f"cache-{tag}"),
            "teach": {"concurrency": conc, "batch_size": batch, "num_cpus": ncpu, "verify": False},
            "student": {"kind": "mlp"},
            "losses": [{"name": "kd"}],
            "tracking": {"model_name": "b"},
        }
    )
    t = time.perf_counter()
    src = load_source(cfg.source, tmp / "q")
    t_idx = time.perf_counter() - t
    t = time.perf_counter()
    r = teach_one(cfg, cfg.teachers[0], src)
    t_teach = time.perf_counter() - t
    assert r.rows_taught == n, r.rows_taught
    return t_idx, t_teach


def _out_schema() -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("logits", pa.list_(pa.float32(), 10)),
            ("topk_idx", pa.list_(pa.int32(), 4)),
            ("topk_val", pa.list_(pa.float16(), 4)),
            ("tail_lse", pa.float32()),
        ]
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs=2, default=(100_000, 600_000))
    a = ap.parse_args()
    main(tuple(a.sizes))

"""Teach stage throughput: kdpipe's Ray Data actor-pool stage vs a plain single-process PyTorch loop,
same teacher, same rows, measured side by side in one run; plus rows/s against this CPU's measured
fp32 matmul peak (teacher FLOPs per row / peak)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import best_of, big_digits_teacher, digits_rows, matmul_peak_gflops, save


def main(rows: int = 200_000, hidden: tuple[int, ...] = (2048, 2048), batch: int = 4096) -> dict:
    import ray

    from kdpipe.arrays import to_numpy
    from kdpipe.config import parse_spec
    from kdpipe.runtime import init_ray
    from kdpipe.teach import output_columns, teach_one

    tmp = Path(tempfile.mkdtemp(prefix="kdbench-"))
    net = big_digits_teacher(tmp / "teacher", list(hidden)).eval()
    src, table = digits_rows(rows)
    x = to_numpy(table["x"], np.float32)
    flops_row = 2 * sum(a * b for a, b in zip([64, *hidden], [*hidden, 10]))
    peak = matmul_peak_gflops()

    @torch.no_grad()
    def plain() -> None:  # what a user would write: one process, same batch size, same output format
        for i in range(0, rows, batch):
            out = {"logits": net(torch.from_numpy(x[i : i + batch])).numpy()}
            output_columns(out, ["logits", "topk"], 4)

    t_plain = best_of(plain, 2)

    init_ray()
    cpus = int(ray.cluster_resources()["CPU"])
    results = {}
    for conc, ncpu in ((1, float(cpus)), (cpus, 1.0)):
        spec = {
            "name": "bench", "source": {"kind": "sklearn_digits"},
            "teachers": [{"id": "big", "kind": "mlp_classifier", "path": str(tmp / "teacher"), "outputs": ["logits", "topk"], "topk": 4}],
            "teach": {"concurrency": conc, "batch_size": batch, "num_cpus": ncpu, "cache_root": str(tmp / f"cache{conc}"), "verify": False},
            "student": {"kind": "mlp"}, "losses": [{"name": "kd"}], "tracking": {"model_name": "b"},
        }
        cfg = parse_spec(spec)
        src.table = table
        src.fingerprint = f"bench{rows}"
        times = []
        for rep in range(2):
            cfg.teach.cache_root = str(tmp / f"cache{conc}-{rep}")
            t = time.perf_counter()
            r = teach_one(cfg, cfg.teachers[0], src)
            times.append(time.perf_counter() - t)
            assert r.rows_taught == rows
        results[f"actors={conc}x{ncpu:g}cpu"] = min(times)
    best_key = min(results, key=results.get)
    t_ray = results[best_key]
    out = {
        "rows": rows, "teacher_hidden": list(hidden), "batch_size": batch,
        "plain_loop_s": t_plain, "plain_rows_per_s": rows / t_plain,
        "ray_stage_s": results, "ray_best": best_key, "ray_rows_per_s": rows / t_ray,
        "ray_vs_plain": t_plain / t_ray,
        "teacher_gflop_per_row": flops_row / 1e9, "matmul_peak_gflops": peak,
        "physical_limit_rows_per_s": peak * 1e9 / flops_row,
        "plain_fraction_of_limit": rows / t_plain / (peak * 1e9 / flops_row),
        "ray_fraction_of_limit": rows / t_ray / (peak * 1e9 / flops_row),
        "note": "ray_stage_s includes Ray Data scheduling, the actor start (teacher load), Parquet write and the manifest/checksum commit",
    }
    save("teach_throughput", out)
    print(f"teach stage, {rows} rows, MLP {hidden}: plain loop {rows / t_plain:,.0f} rows/s, "
          f"kdpipe Ray Data ({best_key}) {rows / t_ray:,.0f} rows/s -> ratio {t_plain / t_ray:.2f}x; "
          f"physical limit {peak * 1e9 / flops_row:,.0f} rows/s (matmul peak {peak:.0f} GFLOP/s)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    a = ap.parse_args()
    main(a.rows)

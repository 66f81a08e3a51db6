"""The fixed costs of Ray and PyTorch on this machine that the README's architecture and platform
notes cite, each measured in a fresh process (a fresh Ray where one is needed):

- `process_cpu`: CPU seconds a Python process spends importing Ray, Ray Train, Ray Data and torch
  (what each Ray Train worker, controller and split coordinator pays at start);
- `train_start`: a 1-worker Ray Train fit (V2, kdpipe's local settings): seconds from `fit()` to the
  train loop's first line, to its first batch of a dataset shard, and from the loop's end to
  `fit()` returning;
- `report_wait`: seconds each checkpointed `ray.train.report` blocks, with the Train controller's
  poll at Ray's default 2 s and at the 0.2 s kdpipe's embedded Ray sets;
- `parquet_reader`: seconds of `read_parquet(<30 KB file>).materialize()` with Ray Data's V1 and
  V2 (default) Parquet readers;
- `actor_pipeline`: seconds of a trivial one-actor `map_batches` pipeline over 100 rows;
- `adamw_step`: milliseconds of `optimizer.step()` for a 2-layer MiniLM student, PyTorch's fused
  AdamW vs its default (multi-tensor) one.

    python bench/platform_costs.py

Writes bench/results/platform_costs.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_env, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPORTS = 6


def in_fresh_process(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `name` below in a new interpreter (its own Ray) and return what it printed as JSON."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.platform_costs", "--one", name],
        cwd=ROOT,
        env={**fresh_env(), "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def process_cpu() -> dict[str, Any]:
    import resource

    code = "import ray, ray.train, ray.train.torch, ray.data, torch"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"imports": code, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}


def _fit(with_data: bool) -> dict[str, Any]:
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kdpipe.runtime import init_ray

    init_ray()
    with tempfile.TemporaryDirectory() as d:
        marks = Path(d) / "marks.json"

        def loop(cfg: dict[str, Any]) -> None:
            import json
            import tempfile
            import time
            from pathlib import Path

            import ray.train

            m: dict[str, Any] = {"loop_start": time.time()}
            if cfg["with_data"]:
                next(iter(ray.train.get_dataset_shard("train").iter_batches(batch_size=64)))
                m["first_batch"] = time.time()
            waits = []
            for i in range(cfg["reports"]):
                with tempfile.TemporaryDirectory() as c:
                    (Path(c) / "w").write_text(str(i))
                    t = time.time()
                    ray.train.report({"i": i}, checkpoint=ray.train.Checkpoint.from_directory(c))
                    waits.append(time.time() - t)
            m["report_s"] = waits
            m["loop_end"] = time.time()
            Path(cfg["marks"]).write_text(json.dumps(m))

        datasets = {"train": ray.data.range(2000)} if with_data else None
        trainer = TorchTrainer(
            loop,
            train_loop_config={"marks": str(marks), "with_data": with_data, "reports": REPORTS if not with_data else 0},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=d, name="bench"),
            datasets=datasets,
        )
        t0 = time.time()
        trainer.fit()
        t1 = time.time()
        m = json.loads(marks.read_text())
    res = {
        "fit_s": round(t1 - t0, 2),
        "to_loop_start_s": round(m["loop_start"] - t0, 2),
        "after_loop_s": round(t1 - m["loop_end"], 2),
    }
    if with_data:
        res["loop_start_to_first_batch_s"] = round(m["first_batch"] - m["loop_start"], 2)
    else:
        res["report_s"] = [round(x, 3) for x in m["report_s"]]
        res["median_report_s"] = round(statistics.median(m["report_s"][1:]), 3)
    return res


def parquet_reader() -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.data import DataContext

    from kdpipe.runtime import init_ray

    init_ray()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "small.parquet"
        rng = np.random.default_rng(0)
        pq.write_table(pa.table({"id": np.arange(3000), "x": rng.standard_normal(3000).astype(np.float32)}), path)
        out: dict[str, Any] = {"file_kb": round(path.stat().st_size / 1024, 1)}
        ctx = DataContext.get_current()
        for name, v2 in (("v1", False), ("v2", True)):
            ctx.use_datasource_v2 = v2
            times = []
            for _ in range(3):
                t = time.perf_counter()
                ray.data.read_parquet(str(path)).materialize()
                times.append(round(time.perf_counter() - t, 2))
            out[f"{name}_s"] = times
    return out


def actor_pipeline() -> dict[str, Any]:
    import ray

    from kdpipe.runtime import init_ray

    class Identity:
        def __call__(self, batch: Any) -> Any:
            return batch

    init_ray()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        ray.data.range(100).map_batches(Identity, concurrency=1, num_cpus=1).materialize()
        times.append(round(time.perf_counter() - t, 2))
    return {"rows": 100, "seconds": times}


def adamw_step() -> dict[str, Any]:
    import torch

    from kdpipe.train import StudentMeta, build_student

    torch.manual_seed(0)
    meta = StudentMeta(in_dim=None, num_classes=0, teachers=["minilm"], widths={})
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for name, kwargs in (("fused", {"fused": True}), ("default", {})):
        s = build_student("hf_encoder", {"tokens_from": "minilm", "layers": 2, "init_from_teacher": [0, 5]}, meta)
        ids = torch.randint(1000, 20000, (32, 32))
        batch = {s.serving_inputs[0]: ids, s.serving_inputs[1]: torch.ones_like(ids)}
        s(batch)["embedding"].square().sum().backward()
        opt = torch.optim.AdamW(s.parameters(), lr=1e-4, weight_decay=0.01, **kwargs)
        steps = []
        for _ in range(12):
            t = time.perf_counter()
            opt.step()
            steps.append((time.perf_counter() - t) * 1000)
        out[f"{name}_ms"] = round(statistics.median(steps[2:]), 1)
        out["params"] = sum(p.numel() for p in s.parameters())
    return out


ONE = {
    "process_cpu": process_cpu,
    "train_start": lambda: _fit(with_data=True),
    "report_wait": lambda: _fit(with_data=False),
    "parquet_reader": parquet_reader,
    "actor_pipeline": actor_pipeline,
    "adamw_step": adamw_step,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        print(json.dumps(ONE[argv[1]]()), flush=True)
        return
    res: dict[str, Any] = {
        "process_cpu": in_fresh_process("process_cpu"),
        "train_start": in_fresh_process("train_start"),
    }
    res["report_wait"] = {
        f"poll_{poll}_s": in_fresh_process("report_wait", {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll})
        for poll in ("2", "0.2")
    }
    for name in ("parquet_reader", "actor_pipeline", "adamw_step"):
        res[name] = in_fresh_process(name)
        print(name, res[name], flush=True)
    print(save("platform_costs", {"command": "python bench/platform_costs.py", **res}))


if __name__ == "__main__":
    main()

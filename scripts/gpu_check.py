"""Measure kdpipe's CUDA path on a GPU machine (README, "GPU"); writes JSON (default
bench/results/gpu_check.json, or $OUT/gpu_check.json where $OUT is set).

1. The README's causal-LM pipeline (`pipelines/lm_distill.yaml`: the 4 × 256 Llama teacher
   pretrained on WordNet glosses, 3,000 glosses, student + twin) with the teacher pretrained and
   taught on the GPU (`teach.num_gpus: 1`, bf16) and the students trained with `train.use_gpu`
   (bf16 autocast): time per stage and the results table.
2. The same teacher teaching the same glosses into two caches, bf16 on the GPU and fp32 on the
   CPU: teach throughput of each, and how far the bf16 cache is from the fp32 one (top-1
   agreement, top-k overlap, |Δ log p| of the top-1 token, |Δ| of the tail mass), per real token.

Usage: python scripts/gpu_check.py [--rows N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def env() -> dict:
    import ray
    import torch
    import transformers

    d = {
        "torch": torch.__version__,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        d.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported())
    return d


SMOKE: dict = {}  # --smoke: a tiny recipe and few rows, to try this script on a CPU-only machine


def overrides(tmp: Path, **extra) -> dict:
    import torch

    if not torch.cuda.is_available():  # --smoke on a CPU machine: same code path, CPU settings
        extra = {**extra, "teach.num_gpus": 0, "train.use_gpu": False}
    return {
        "storage": str(tmp),
        "teachers.0.params.pretrain_root": str(tmp / "teachers"),
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
        **extra,
        **SMOKE,
    }


def lm_pipeline_on_gpu(tmp: Path, rec: dict) -> None:
    """The README's LM pipeline, teacher and students on the GPU; seconds per stage, recorded in
    `rec` as each stage finishes (a failure later keeps what ran)."""
    from kdpipe.config import load_spec
    from kdpipe.lm.pretrain import pretrain
    from kdpipe.pipeline import distil, prepare, teach
    from teachers.hf_causal_lm import _params

    cfg = load_spec(
        "pipelines/lm_distill.yaml",
        overrides(tmp, **{"teach.num_gpus": 1, "train.use_gpu": True, "train.num_workers": 1}),
    )
    t0 = time.perf_counter()
    p = _params(cfg.teachers[0])
    rep = pretrain(p.pretrain, root=p.pretrain_root).report
    t1 = time.perf_counter()
    rec.update(
        pretrain_s=round(t1 - t0, 1),
        pretrain_device=rep.get("device"),
        pretrain_autocast=rep.get("autocast"),
        teacher_heldout_ppl=rep["heldout_ppl"],
        teacher_unigram_ppl=rep["unigram_ppl"],
    )
    source, uri = prepare(cfg)
    taught = teach(cfg, source)
    t2 = time.perf_counter()
    rec["teach_s"] = round(t2 - t1, 1)
    res = distil(cfg, source, taught, uri)
    rec.update(
        distil_s=round(time.perf_counter() - t2, 1),
        table=res.table,
        promoted=res.promoted,
        gate=res.gate_reasons,
        metrics={k: v for k, v in res.metrics.items() if k.startswith(("test_", "baseline_test_"))},
    )
    from mlflow.tracking import MlflowClient

    params = MlflowClient(res.tracking_uri).get_run(res.run_id).data.params
    rec.update(train_device=params.get("train_device"), train_precision=params.get("train_precision"))


def teach_cache(tmp: Path, name: str, rows: int, gpu: bool) -> tuple[float, Path, int]:
    from kdpipe.config import load_spec
    from kdpipe.pipeline import prepare, teach

    extra = {"source.limit": rows, "storage": str(tmp / f"cache-{name}"), "teach.batch_size": 256}
    extra.update(
        {"teach.num_gpus": 1, "teach.concurrency": 1}
        if gpu
        else {
            "teach.num_gpus": 0,
            "teach.concurrency": max(1, ((os.cpu_count() or 2) - 2) // 4),
            "teach.num_cpus": max(1, min(4, (os.cpu_count() or 2) - 1)),
        }
    )  # 2 CPUs spare for Ray Data
    cfg = load_spec("pipelines/lm_distill.yaml", overrides(tmp, **extra))
    source, _ = prepare(cfg)
    t0 = time.perf_counter()
    taught = teach(cfg, source)
    return time.perf_counter() - t0, taught["lm"].cache, cfg.teachers[0].topk


def _decoded(cache, width: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdpipe.lm.topk_codec import decode_batch

    t = pa.concat_tables([pq.read_table(f, columns=["id", "topk_lm"]) for f in cache.files()]).sort_by("id")
    return {"id": t["id"].to_pylist(), "batch": decode_batch(t["topk_lm"], width)}


def compare_caches(gpu_cache, cpu_cache, width: int) -> dict:
    """The bf16 (GPU) cache against the fp32 (CPU) one, over real tokens of the same rows."""
    g, c = _decoded(gpu_cache, width), _decoded(cpu_cache, width)
    assert g["id"] == c["id"], "the two caches hold different rows"
    gb, cb = g["batch"], c["batch"]
    m = cb.mask.astype(bool) & gb.mask.astype(bool)
    top1 = (gb.ids[..., 0] == cb.ids[..., 0])[m]
    k = cb.ids.shape[-1]
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(gb.ids[m], cb.ids[m])])
    tail = lambda b: np.exp(b.tail_logp[m])  # noqa: E731
    return {
        "tokens": int(m.sum()),
        "top1_agreement": float(top1.mean()),
        "topk_overlap": float(overlap.mean()),
        "top1_abs_dlogp_mean": float(np.abs(gb.logp[..., 0] - cb.logp[..., 0])[m].mean()),
        "tail_mass_abs_diff_mean": float(np.abs(tail(gb) - tail(cb)).mean()),
    }


def teach_bf16_vs_fp32(tmp: Path, rows: int, rec: dict) -> None:
    g_s, g_cache, _ = teach_cache(tmp, "gpu", rows, gpu=True)
    c_s, c_cache, _ = teach_cache(tmp, "cpu", rows, gpu=False)
    width = 48
    d = compare_caches(g_cache, c_cache, width)
    rec.update(
        {
            "rows": rows,
            "gpu_bf16_teach_s": round(g_s, 1),
            "cpu_fp32_teach_s": round(c_s, 1),
            "gpu_tokens_per_s": round(d["tokens"] / g_s),
            "cpu_tokens_per_s": round(d["tokens"] / c_s),
            "speedup": round(c_s / g_s, 2),
            "bf16_vs_fp32": d,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10000, help="glosses taught twice (GPU bf16, CPU fp32)")
    ap.add_argument(
        "--out",
        default=str(Path(os.environ["OUT"]) / "gpu_check.json")
        if os.environ.get("OUT")
        else "bench/results/gpu_check.json",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny teacher and 200 rows (a dry run of this script)")
    ap.add_argument("--only", choices=["lm_pipeline", "teach"], help="run one section")
    a = ap.parse_args()
    if a.smoke:
        SMOKE.update(
            {
                "teachers.0.params.pretrain": {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64, "steps": 5},
                "source.limit": 200,
                "train.epochs": 1,
                "student.params": {"tokens_from": "lm", "num_layers": 1, "init_from_teacher_layers": [0]},
            }
        )
        a.rows = 200
    from kdpipe.runtime import init_ray

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kdpipe").setLevel(logging.INFO)

    out = {"env": env(), "command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:])}
    init_ray()
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-gpu-"))
    for name, fn in (
        ("lm_pipeline", lambda rec: lm_pipeline_on_gpu(tmp, rec)),
        ("teach", lambda rec: teach_bf16_vs_fp32(tmp, a.rows, rec)),
    ):
        if a.only and name != a.only:
            continue
        out[name] = {}
        try:
            fn(out[name])
        except Exception:  # keep what ran, and what the other section measures
            out[name]["error"] = traceback.format_exc()[-3000:]
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2, default=str))
        print(json.dumps({name: out[name]}, indent=2, default=str), flush=True)


if __name__ == "__main__":
    main()

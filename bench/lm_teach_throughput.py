"""Causal-LM teach throughput: kdpipe's Ray Data teach stage vs a plain single-process loop doing
the same work (tokenise, Hugging Face forward, top-k + tail, the same compressed top-k encoding,
Parquet write), same teacher, same glosses, side by side in one run, at two sizes; steady-state
tokens/s are fitted from the two sizes (t = fixed + tokens / rate), so start-up costs cancel.

The teacher is the README's LM teacher (`pipelines/lm_distill.yaml`'s 4 × 256 Llama recipe, pretrained
once and reused by digest). The physical limit is the teacher's FLOPs per token (2 · parameters, the
output layer included) over this CPU's measured fp32 matmul peak. Writes
bench/results/lm_teach_throughput.json (`steady_state_ratio` = kdpipe ÷ plain loop).

    python bench/lm_teach_throughput.py [--sizes 3000 12000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import matmul_peak_gflops, save  # noqa: E402

BATCH = 64


def _teacher_cfg(teachers_root: Path) -> object:
    from kdpipe.config import load_spec
    from kdpipe.lm.pretrain import pretrain
    from teachers.hf_causal_lm import _params

    spec = load_spec(ROOT / "pipelines" / "lm_distill.yaml", {"teachers.0.params.pretrain_root": str(teachers_root)})
    p = _params(spec.teachers[0])
    pretrain(p.pretrain, root=p.pretrain_root)  # reused when it exists (≈10 min on 2 cores when not)
    return spec.teachers[0]


def _plain_loop(tcfg: object, texts: list[str], out: Path) -> int:
    """What a user would write: one process, the teacher loaded once, batches of texts through the
    same forward and encoding, one Parquet file. Returns the real tokens taught."""
    from kdpipe.teach import output_columns
    from teachers.hf_causal_lm import HFCausalLMTeacher

    teacher = HFCausalLMTeacher.load(tcfg)
    tokens, writer = 0, None
    for i in range(0, len(texts), BATCH):
        res = teacher.forward({"text": texts[i : i + BATCH]})
        tokens += int(res["attention_mask"].sum())
        cols = output_columns(res, list(tcfg.outputs), tcfg.topk, teacher.vocab)
        table = pa.table({"id": pa.array([str(j) for j in range(i, i + len(res["input_ids"]))]), **cols})
        writer = writer or pq.ParquetWriter(out, table.schema, compression="zstd", use_dictionary=False)
        writer.write_table(table)
    writer.close()
    return tokens


def _kdpipe(tcfg: object, text_file: Path, cache_root: Path, cpus: int) -> tuple[float, int]:
    """`teach_one` on a text source of the same glosses: Ray Data read, one actor with `cpus` CPUs,
    forward + encoding, Parquet write, exactly-once row check, checksums, manifest."""
    from kdpipe.config import parse_spec
    from kdpipe.data import load_source
    from kdpipe.teach import teach_one

    cfg = parse_spec(
        {
            "name": "bench",
            "source": {"kind": "text", "path": str(text_file)},
            "teachers": [tcfg.model_dump()],
            "storage": str(cache_root),
            "teach": {"concurrency": 1, "batch_size": BATCH, "num_cpus": cpus, "verify": False},
            "student": {"kind": "causal_lm", "params": {"tokens_from": tcfg.id}},
            "losses": [{"name": "lm_ce"}],
            "evaluate": {"task": "lm"},
            "tracking": {"model_name": "b"},
        }
    )
    src = load_source(cfg.source, cache_root / "q")
    t = time.perf_counter()
    r = teach_one(cfg, cfg.teachers[0], src)
    took = time.perf_counter() - t
    tokens = sum(
        int(pq.read_table(f, columns=["attention_mask"])["attention_mask"].combine_chunks().flatten().to_numpy().sum())
        for f in r.cache.files()
    )
    return took, tokens


def main(sizes: tuple[int, int] = (3000, 12000), teachers_root: Path = ROOT / ".kdpipe" / "teachers") -> dict:
    import os

    import torch

    from kdpipe.lm.corpus import load_glosses
    from kdpipe.runtime import init_ray

    tcfg = _teacher_cfg(teachers_root)
    # one CPU stays free for Ray Data's index-read tasks: an actor holding every CPU of a 2-CPU node
    # starves them and the text-source stage never starts (seen here); the plain loop gets the same threads
    cpus = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(cpus)
    texts_all = load_glosses("train", "all")
    tmp = Path(tempfile.mkdtemp(prefix="kdbench-lmteach-"))
    peak = matmul_peak_gflops()
    init_ray()
    runs = {}
    for n in sizes:
        texts = texts_all[:n]
        f = tmp / f"glosses{n}" / "glosses.txt"
        f.parent.mkdir(parents=True)
        f.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
        t = time.perf_counter()
        plain_tokens = _plain_loop(tcfg, texts, tmp / f"plain{n}.parquet")
        t_plain = time.perf_counter() - t
        t_kd, kd_tokens = _kdpipe(tcfg, f, tmp / f"cache{n}", cpus)
        runs[n] = {"plain_s": t_plain, "plain_tokens": plain_tokens, "kdpipe_s": t_kd, "kdpipe_tokens": kd_tokens}
        print(
            f"{n} glosses: plain {plain_tokens / t_plain:,.0f} tokens/s ({t_plain:.1f} s), kdpipe teach "
            f"{kd_tokens / t_kd:,.0f} tokens/s ({t_kd:.1f} s)",
            flush=True,
        )
    n1, n2 = sizes
    rate = {
        k: (runs[n2][f"{k}_tokens"] - runs[n1][f"{k}_tokens"]) / (runs[n2][f"{k}_s"] - runs[n1][f"{k}_s"])
        for k in ("plain", "kdpipe")
    }
    from teachers.hf_causal_lm import HFCausalLMTeacher

    params = sum(p.numel() for p in HFCausalLMTeacher.load(tcfg).model.parameters())
    flops_token = 2 * params  # tied embeddings: the output layer's V·d counted once, the lookup is free
    limit = peak * 1e9 / flops_token
    out = {
        "sizes_glosses": list(sizes),
        "batch_size": BATCH,
        "topk": tcfg.topk,
        "runs": runs,
        "steady_tokens_per_s": rate,
        "steady_state_ratio": rate["kdpipe"] / rate["plain"],
        "end_to_end_ratio": {
            n: (runs[n]["kdpipe_tokens"] / runs[n]["kdpipe_s"]) / (runs[n]["plain_tokens"] / runs[n]["plain_s"])
            for n in sizes
        },
        "teacher_params": params,
        "flops_per_token": flops_token,
        "matmul_peak_gflops": peak,
        "physical_limit_tokens_per_s": limit,
        "plain_fraction_of_limit": rate["plain"] / limit,
        "kdpipe_fraction_of_limit": rate["kdpipe"] / limit,
        "torch_threads": torch.get_num_threads(),
        "actor_cpus": cpus,
        "note": "plain loop: the same teacher adapter forward + encoding + Parquet write in one warm process (the "
        "teacher loaded once, not timed). kdpipe: teach_one with one actor of `actor_cpus` CPUs (Ray already "
        "started; the source indexed before timing); the plain loop uses as many torch threads.",
    }
    save("lm_teach_throughput", out)
    print(
        f"steady state: plain {rate['plain']:,.0f} tokens/s, kdpipe {rate['kdpipe']:,.0f} tokens/s -> "
        f"{out['steady_state_ratio']:.2f}x; physical limit {limit:,.0f} tokens/s (matmul peak {peak:.0f} GFLOP/s)"
    )
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=(3000, 12000))
    a = ap.parse_args()
    main(tuple(a.sizes))

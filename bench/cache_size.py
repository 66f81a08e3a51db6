"""Cache size and fidelity: dense fp32 logits vs top-k fp16 (+ tail log-sum-exp) per row, and the KL
between the teacher's true distribution and the one the top-k KD loss reconstructs (T = 1 and T = 4)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.common import save


def parquet_bytes(table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.tell()


def main() -> dict:
    import tempfile
    from pathlib import Path

    from kdpipe.arrays import to_fixed_list
    from kdpipe.config import SourceConfig, TeacherConfig
    from kdpipe.data import load_source
    from kdpipe.losses.functional import topk_teacher_logprobs
    from kdpipe.teach import topk_compress
    from teachers.mlp import MLPTeacher

    src = load_source(SourceConfig(kind="sklearn_digits", split={"labeled_fraction": 0.5}))
    tmp = Path(tempfile.mkdtemp())
    tcfg = TeacherConfig(id="t", kind="mlp_classifier", path=str(tmp / "t"), params={"hidden": [256], "epochs": 100})
    MLPTeacher.prepare(tcfg, src, str(tmp))
    from kdpipe.arrays import to_numpy

    logits = MLPTeacher.load(tcfg).forward({"x": to_numpy(src.table["x"], np.float32)})["logits"]
    n, c = logits.shape
    ids = src.table["id"]
    dense_b = parquet_bytes(pa.table({"id": ids, "logits": to_fixed_list(logits.astype(np.float32))}))
    id_b = parquet_bytes(pa.table({"id": ids}))
    rows = []
    for k in (1, 2, 4, 10):
        idx, val, tail = topk_compress(logits, k)
        b = parquet_bytes(
            pa.table(
                {"id": ids, "topk_idx": to_fixed_list(idx), "topk_val": to_fixed_list(val), "tail_lse": pa.array(tail)}
            )
        )
        row = {"k": k, "bytes_per_row": (b - id_b) / n, "vs_dense": (b - id_b) / (dense_b - id_b)}
        for T in (1.0, 4.0):
            t = torch.from_numpy(logits)
            logp = torch.log_softmax(t / T, 1)
            # the dense distribution bucketed the same way, vs the reconstruction from the cache
            ii = torch.from_numpy(idx).long()
            rest = logp.masked_fill(torch.zeros_like(logp, dtype=torch.bool).scatter(1, ii, True), float("-inf"))
            true = torch.cat([logp.gather(1, ii), rest.logsumexp(1, keepdim=True)], 1)  # tail bucket; -inf when k = C
            rec = topk_teacher_logprobs(
                torch.from_numpy(idx), torch.from_numpy(val.astype(np.float32)), torch.from_numpy(tail), c, T
            )
            p = true.exp()
            kl = torch.where(p > 1e-12, p * (true - rec.clamp(min=-1e4)), torch.zeros_like(p)).sum(1).mean()
            row[f"kl_T{T:g}"] = float(kl)
        rows.append(row)
    out = {"rows": n, "classes": c, "dense_fp32_bytes_per_row": (dense_b - id_b) / n, "topk": rows}
    save("cache_size", out)
    print(f"dense fp32: {out['dense_fp32_bytes_per_row']:.1f} B/row ({c} classes)")
    for r in rows:
        print(
            f"top-{r['k']:<2} fp16: {r['bytes_per_row']:.1f} B/row ({r['vs_dense']:.2f}x dense); "
            f"KL(true||reconstructed) T=1 {r['kl_T1']:.2e}, T=4 {r['kl_T4']:.2e}"
        )
    return out


if __name__ == "__main__":
    main()

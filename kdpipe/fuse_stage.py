"""The fusion stage: the ``fused`` teacher cache, written (or reused, or extended) from the member
teachers' caches, in Ray Data — the member caches joined on `id` and fused block by block with the
maths of `kdpipe.fusion`, per row for classifiers and per token for causal LMs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdpipe import storage
from kdpipe.arrays import to_fixed_list, to_numpy
from kdpipe.cache import cache_at, fingerprint, staged_files
from kdpipe.data import SourceData
from kdpipe.fusion import fuse
from kdpipe.lm.token_fusion import fuse_topk
from kdpipe.lm.topk_codec import COLUMN, decode_batch, encode_batch, read_header
from kdpipe.losses.functional import dense_from_topk
from kdpipe.spec import PipelineConfig
from kdpipe.teach import TeachResult
from kdpipe.todo import ID_BYTES, check_staged, rows_missing
from kdpipe.views import Side, cache_side, join_on_id
from teachers import TEACHERS

log = logging.getLogger("kdpipe.fusion")

FUSION_FORMAT = 1  # bumped when the fused outputs change for the same inputs, so old caches are not reused


def fused_fingerprint(cfg: PipelineConfig, results: dict[str, TeachResult]) -> str:

    f = cfg.teach.fusion
    assert f is not None
    return fingerprint(
        {
            "kind": "fusion",
            "members": {t: results[t].fingerprint for t in f.teachers},
            "fusion": f.model_dump(mode="json"),
            "sharpness": f.sharpness,
            "format": FUSION_FORMAT,
        }
    )


def _member_logits(tid: str, block: Any, num_classes: int | None) -> np.ndarray:
    """Dense logits of one member teacher for the rows of a joined block (``<tid>.<column>``
    columns), rebuilt from its top-k when only that is cached."""

    if f"{tid}.logits" in block.column_names:
        return to_numpy(block[f"{tid}.logits"], np.float32)
    if f"{tid}.topk_idx" not in block.column_names:
        raise ValueError(
            f"fusion: teacher '{tid}' cache has neither `logits` nor `topk` outputs; "
            f"add `outputs: [logits]` to that teacher"
        )
    if num_classes is None:
        raise ValueError("fusion of top-k caches needs the number of classes (set source.num_classes)")
    rebuilt = dense_from_topk(
        torch.tensor(to_numpy(block[f"{tid}.topk_idx"]).astype(np.int64)),
        torch.tensor(to_numpy(block[f"{tid}.topk_val"], np.float32)),
        torch.tensor(to_numpy(block[f"{tid}.tail_lse"], np.float32)),
        num_classes,
    )
    return rebuilt.numpy()


def fuse_block(
    block: Any,
    members: list[str],
    num_classes: int | None,
    mode: str,
    weights: Any,
    temperature: float,
    steps: int,
    sharpness: float,
) -> Any:
    """`map_batches` step: the members' outputs of a block of rows -> ``id``, fused ``logits`` and
    per-row fusion ``weights`` (every mode is per row, so blocks fuse independently)."""

    torch.set_num_threads(1)
    logits = [_member_logits(t, block, num_classes) for t in members]
    fused, w = fuse(logits, mode, weights, temperature, steps, sharpness)
    return pa.table(
        {
            "id": block["id"],
            "logits": to_fixed_list(fused.numpy().astype(np.float32)),
            "weights": to_fixed_list(w.numpy().astype(np.float32)),
        }
    )


def _token_members(cfg: PipelineConfig, members: list[str]) -> bool:
    """True when the members cache per-token top-k (causal LMs); mixing kinds is an error."""
    kinds = {t.id: "topk" in t.outputs and "tokens" in t.outputs for t in cfg.teachers if t.id in members}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"teach.fusion.teachers {members}: fuse either classifiers or causal LMs, not both "
            f"(per-token caches: {sorted(k for k, v in kinds.items() if v)})"
        )
    return any(kinds.values())


def fuse_token_block(
    block: Any, members: list[str], mode: str, weights: Any, temperature: float, steps: int, sharpness: float
) -> Any:
    """`map_batches` step for causal-LM members: their per-token top-k -> a fused top-k cache row
    (``id``, the shared ``input_ids`` / ``attention_mask``, ``topk_lm``, and ``weights``: each
    member's weight averaged over the row's tokens). See `kdpipe.lm.token_fusion`."""

    torch.set_num_threads(1)
    first = members[0]
    for m in members[1:]:
        if not block[f"{m}.input_ids"].equals(block[f"{first}.input_ids"]):
            raise ValueError(
                f"token fusion: teachers '{first}' and '{m}' tokenised the same rows differently; fuse "
                "teachers that share a tokenizer and `max_length`"
            )
    tokens = {
        "id": block["id"],
        "input_ids": block[f"{first}.input_ids"],
        "attention_mask": block[f"{first}.attention_mask"],
    }
    if block.num_rows == 0:
        return pa.table(
            {
                **tokens,
                COLUMN: pa.array([], pa.binary()),
                "weights": to_fixed_list(np.zeros((0, len(members)), np.float32)),
            }
        )
    seq_len = block[f"{first}.input_ids"].type.list_size
    dec = [decode_batch(block[f"{m}.{COLUMN}"], seq_len) for m in members]
    vocab = read_header(block[f"{first}.{COLUMN}"][0].as_py())["vocab_size"]
    fused, w = fuse_topk(dec, vocab, max(d.ids.shape[-1] for d in dec), mode, weights, steps, sharpness, temperature)
    lengths = fused.mask.sum(1)
    row_w = w.sum(1) / np.maximum(lengths, 1)[:, None]
    return pa.table(
        {
            **tokens,
            **encode_batch(fused.ids, fused.logp, vocab, lengths=lengths, tail_logp=fused.tail_logp),
            "weights": to_fixed_list(row_w.astype(np.float32)),
        }
    )


def fuse_caches(cfg: PipelineConfig, source: SourceData, results: dict[str, TeachResult]) -> TeachResult:
    """Write (or reuse) the ``fused`` teacher cache: columns ``id``, ``logits`` (fused, fp32) and
    ``weights`` (per-example fusion weights, in ``teach.fusion.teachers`` order).

    Lives at ``<storage>/cache/fused/<fingerprint>/``; the fingerprint covers the member caches'
    fingerprints and the fusion config, so new teacher weights or settings never reuse old fusions.
    Incremental like ``teach_one``: only source rows the fused cache lacks are fused, in Ray Data
    (the member caches joined on `id`, fused block by block), staged, checked exactly-once and
    published by ``TeacherCache.commit`` under the cache's lock (manifest last).
    """

    f = cfg.teach.fusion
    if f is None:
        raise ValueError("fuse_caches needs `teach.fusion` in the spec")
    missing = [t for t in f.teachers if t not in results]
    if missing:
        raise KeyError(f"fusion: no cache for teacher(s) {missing}; taught: {sorted(results)}")
    fp = fused_fingerprint(cfg, results)
    cache = cache_at(storage.Layout(cfg.storage).cache, "fused", fp)
    with cache.lock():
        cache.check_usable(cfg.teach.verify)
        todo = rows_missing(source, cache, max(2, cfg.teach.concurrency * 2))
        if todo.rows == 0:
            log.info("fused teacher: reusing cache %s (fingerprint %s)", cache.dir, fp)
            return TeachResult("fused", cache, fp, 0, True)
        ds = join_on_id(
            [Side("todo", todo.index.select_columns(["id"]), todo.rows * ID_BYTES)]
            + [cache_side(t, results[t].cache, cfg.teach.verify) for t in f.teachers]
        )
        common = {
            "members": list(f.teachers),
            "mode": f.mode,
            "weights": f.weights,
            "temperature": f.temperature,
            "steps": f.steps,
            "sharpness": f.sharpness,
        }
        if _token_members(cfg, list(f.teachers)):  # causal LMs: fused token by token into the members' format
            member = next(t for t in cfg.teachers if t.id == f.teachers[0])
            fn, kwargs, outputs = fuse_token_block, common, ["tokens", "topk", "weights"]
            write = TEACHERS.get(member.kind).parquet_options
        else:
            fn, outputs, write = fuse_block, ["logits", "weights"], {}
            kwargs = {**common, "num_classes": source.num_classes or cfg.source.num_classes}
        fused = ds.map_batches(fn, batch_format="pyarrow", batch_size=cfg.teach.batch_size, fn_kwargs=kwargs)
        header = {
            "teacher_id": "fused",
            "teacher_kind": "fusion",
            "fingerprint": fp,
            "weights_digest": "fusion",
            "members": {t: results[t].fingerprint for t in f.teachers},
            "fusion": {**f.model_dump(mode="json"), "sharpness": f.sharpness},
            "output_spec": {"outputs": outputs, "format": FUSION_FORMAT},
        }
        with cache.staging() as staging:
            fused.write_parquet(str(staging), **write)
            got = sum(storage.parquet_metadata(p).num_rows for p in staged_files(staging))
            if got < todo.rows:  # the inner join dropped rows some member does not hold
                raise RuntimeError(
                    f"fusion: the member caches lack {todo.rows - got} of {todo.rows} rows; "
                    "run `kdpipe teach SPEC` first"
                )
            check_staged(staging, todo.tally)
            manifest = cache.commit(
                staging, header, source.fingerprint, ids={"rows": todo.tally.rows, "digest": todo.tally.digest}
            )
    log.info(
        "fused teacher (%s over %s): %d new rows -> %s (now %d rows)",
        f.mode,
        f.teachers,
        todo.rows,
        cache.dir,
        manifest["rows"],
    )
    return TeachResult("fused", cache, fp, todo.rows, False)

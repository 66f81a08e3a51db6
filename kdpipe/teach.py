"""The teach stage: Ray Data streams rows through one actor pool per teacher into the cache."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdpipe import storage, weights
from kdpipe.arrays import to_fixed_list, to_numpy
from kdpipe.cache import TeacherCache, cache_at, fingerprint
from kdpipe.data import SourceData
from kdpipe.errors import KdpipeError
from kdpipe.lm.topk_codec import encode_batch
from kdpipe.progress import TeachProgress
from kdpipe.spec import PipelineConfig, TeacherConfig
from kdpipe.todo import check_staged, rows_missing
from teachers import TEACHERS

log = logging.getLogger("kdpipe.teach")

# Bumped when the way outputs are computed/stored changes, so old caches are not reused.
OUTPUT_FORMAT = 1


def topk_compress(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k logits (indices int32, values fp16) and the log-sum-exp of the rest (fp32).

    The tail log-sum-exp lets the KD loss keep the remaining probability mass as one bucket,
    so the teacher distribution stays normalised; it is -inf when k covers every class.
    """
    logits = logits.astype(np.float32)
    c = logits.shape[1]
    k = min(k, c)
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    val = np.take_along_axis(logits, idx, axis=1)
    if k == c:
        tail = np.full(len(logits), -np.inf, np.float32)
    else:
        mask = np.ones_like(logits, bool)
        np.put_along_axis(mask, idx, False, axis=1)
        rest = np.where(mask, logits, -np.inf)
        m = rest.max(axis=1, keepdims=True)
        tail = (m[:, 0] + np.log(np.exp(rest - m).sum(axis=1))).astype(np.float32)
    return idx.astype(np.int32), val.astype(np.float16), tail


def output_columns(
    out: dict[str, np.ndarray], outputs: list[str], topk: int | None, vocab: int | None = None
) -> dict[str, pa.Array]:
    """Teacher forward outputs -> cache columns, per the spec's `outputs`."""
    cols: dict[str, pa.Array] = {}
    for name in outputs:
        if name == "topk" and "topk_ids" in out:  # per-token (causal LM): one compressed blob per sequence
            cols.update(token_topk_columns(out, vocab))
        elif name == "hidden":  # per-token hidden states of chosen layers, (N, L·H) fp16
            for key, arr in out.items():
                if key.startswith("hidden."):
                    cols[key] = to_fixed_list(arr.astype(np.float16))
        elif name == "logits":
            cols["logits"] = to_fixed_list(out["logits"].astype(np.float32))
        elif name == "topk":
            idx, val, tail = topk_compress(out["logits"], int(topk))  # type: ignore[arg-type]
            cols["topk_idx"] = to_fixed_list(idx)
            cols["topk_val"] = to_fixed_list(val)
            cols["tail_lse"] = pa.array(tail)
        elif name == "features":
            for key, arr in out.items():
                if key.startswith("features."):
                    cols["feat." + key.split(".", 1)[1]] = to_fixed_list(arr.astype(np.float16))
        elif name == "tokens":  # token students read these instead of the text
            for key in ("input_ids", "attention_mask"):
                if key not in out:
                    raise KeyError(f"teacher output 'tokens' needs '{key}' (it produces {sorted(out)})")
                cols[key] = to_fixed_list(out[key].astype(np.int32))
        elif name in ("attn_rel", "value_rel"):  # per-token relations: fp16 when the teacher stores fp16
            if name not in out:
                raise KeyError(f"teacher produced no '{name}' output (it produces {sorted(out)})")
            arr = out[name]
            cols[name] = to_fixed_list(arr if arr.dtype == np.float16 else arr.astype(np.float32))
        else:
            if name not in out:
                raise KeyError(f"teacher produced no '{name}' output (it produces {sorted(out)})")
            cols[name] = to_fixed_list(out[name].astype(np.float32))
    return cols


def token_topk_columns(out: dict[str, np.ndarray], vocab: int | None) -> dict[str, pa.Array]:
    """A causal LM's per-token top-k log-probs and tail mass -> the compressed `topk_lm` column
    (kdpipe.lm.topk_codec: ≈84 B/token at k = 64 on real teacher outputs), one blob per sequence
    holding only its real tokens."""

    if vocab is None:
        raise ValueError("a per-token top-k cache needs the teacher's vocabulary size (Teacher.vocab)")
    lengths = out["attention_mask"].astype(bool).sum(axis=1)
    return encode_batch(out["topk_ids"], out["topk_logp"], vocab, lengths=lengths, tail_logp=out["tail_logp"])


class TeacherActor:
    """Callable class for `map_batches`: loads the teacher once per actor, then maps Arrow batches."""

    def __init__(self, teacher_cfg: dict[str, Any], device: str = "cpu", digest: str | None = None) -> None:

        self.cfg = TeacherConfig.model_validate(teacher_cfg)
        if self.cfg.path and storage.is_remote(self.cfg.path):  # one download per node, shared by its actors
            self.cfg = self.cfg.model_copy(update={"path": str(weights.local_copy(self.cfg.path, digest))})
        self.teacher = TEACHERS.get(self.cfg.kind).load(self.cfg, device=device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        inputs: dict[str, Any] = {}
        if "x" in batch.column_names:
            inputs["x"] = to_numpy(batch["x"], np.float32)
        if "text" in batch.column_names:
            inputs["text"] = batch["text"].to_pylist()
        out = self.teacher.forward(inputs)
        cols = {
            "id": batch["id"],
            **output_columns(out, self.cfg.outputs, self.cfg.topk, getattr(self.teacher, "vocab", None)),
        }
        return pa.table(cols)


@dataclass
class TeachResult:
    teacher_id: str
    cache: TeacherCache
    fingerprint: str
    rows_taught: int
    reused: bool

    def manifest(self) -> dict[str, Any]:
        return self.cache.manifest() or {}


def teacher_fingerprint(tcfg: TeacherConfig, digest: str) -> str:
    return fingerprint(
        {
            "teacher_id": tcfg.id,
            "kind": tcfg.kind,
            "params": tcfg.params,
            "weights": digest,
            "outputs": sorted(tcfg.outputs),
            "topk": tcfg.topk,
            "format": OUTPUT_FORMAT,
        }
    )


def cache_of(cfg: PipelineConfig, tcfg: TeacherConfig, source: SourceData) -> tuple[TeacherConfig, str, TeacherCache]:
    """A teacher's cache as the spec names it, training nothing: (teacher with its weights located,
    fingerprint, cache)."""

    cls = TEACHERS.get(tcfg.kind)
    tcfg = cls.resolve(tcfg, source, cfg.storage)
    fp = teacher_fingerprint(tcfg, cls.weights_digest(tcfg))
    return tcfg, fp, cache_at(storage.Layout(cfg.storage).cache, tcfg.id, fp)


def teach_one(cfg: PipelineConfig, tcfg: TeacherConfig, source: SourceData) -> TeachResult:
    """Teach the rows of `source` that the cache does not hold yet; reuse the rest."""

    cls = TEACHERS.get(tcfg.kind)
    if cls.input_kind != source.input_kind:
        raise KdpipeError(
            f"teacher '{tcfg.id}' ({tcfg.kind}) reads {cls.input_kind} inputs but the source gives "
            f"{source.input_kind}; set source.{'features' if cls.input_kind == 'features' else 'text'}: <column>"
        )
    tcfg = cls.prepare(tcfg, source, cfg.storage)
    digest = cls.weights_digest(tcfg)
    fp = teacher_fingerprint(tcfg, digest)
    cache = cache_at(storage.Layout(cfg.storage).cache, tcfg.id, fp)
    with cache.lock():
        return _teach_missing(cfg, tcfg, source, cache, fp, digest)


def _teach_missing(
    cfg: PipelineConfig, tcfg: TeacherConfig, source: SourceData, cache: TeacherCache, fp: str, digest: str
) -> TeachResult:

    cache.check_usable(cfg.teach.verify)  # its ids are read next: checked first
    todo = rows_missing(source, cache, read_blocks(cfg.teach, source))
    if todo.rows == 0:
        log.info("teacher %s: reusing cache %s (fingerprint %s)", tcfg.id, cache.dir, fp)
        return TeachResult(tcfg.id, cache, fp, 0, True)
    log.info("teacher %s: teaching %d new rows (of %d) -> %s", tcfg.id, todo.rows, source.num_rows, cache.dir)

    header = {
        "teacher_id": tcfg.id,
        "teacher_kind": tcfg.kind,
        "weights_digest": digest,
        "fingerprint": fp,
        "output_spec": {"outputs": tcfg.outputs, "topk": tcfg.topk, "format": OUTPUT_FORMAT},
        "params": tcfg.params,
        "path": tcfg.path,
    }
    with cache.staging() as staging:
        ds = teach_dataset(cfg.teach, tcfg, source, todo.index, digest)
        try:
            with TeachProgress(f"teacher {tcfg.id}", staging, todo.rows):
                ds.write_parquet(str(staging), **TEACHERS.get(tcfg.kind).parquet_options)
        except Exception as e:  # Ray Data wraps errors raised in the actors; surface ours as they were
            root = _kdpipe_cause(e)
            if root is None:
                raise
            raise root from None
        check_staged(staging, todo.tally)
        manifest = cache.commit(
            staging, header, source.fingerprint, ids={"rows": todo.tally.rows, "digest": todo.tally.digest}
        )
    log.info("teacher %s: cache now %d rows in %d part(s)", tcfg.id, manifest["rows"], len(manifest["parts"]))
    return TeachResult(tcfg.id, cache, fp, todo.rows, False)


def read_blocks(t: Any, source: SourceData) -> int:
    """How many read blocks to cut the source's rows into: enough to keep every actor busy, few
    enough that each holds a few batches (line formats, scanned from the top by every block: few)."""
    return max(t.concurrency * 2, math.ceil(source.num_rows / (4 * t.batch_size)) if source.seekable else 0)


def teach_dataset(
    t: Any, tcfg: TeacherConfig, source: SourceData, index: Any | None = None, digest: str | None = None
) -> Any:
    """The lazy Ray Dataset of the teacher's outputs for the index rows `index` (a Ray Dataset,
    default every source row): inputs read by position, then the teacher's actor pool
    (`teach.concurrency` actors, each with `teach.num_cpus` / `teach.num_gpus`)."""
    import ray

    remote = {"num_cpus": t.num_cpus, "num_gpus": t.num_gpus or None}
    # On CPUs the read step asks for the teacher's resources, so Ray Data fuses it into the actors.
    # A GPU teacher gets its rows from CPU read tasks instead: the GPU does not wait on file reads
    # and tokenising (and Ray Data refuses a GPU map step without a fixed batch size).
    read = {"num_cpus": t.num_cpus} if t.num_gpus else remote
    total = ray.cluster_resources().get("CPU", 0.0) if ray.is_initialized() else 0.0
    if total and t.num_cpus * t.concurrency >= total:
        log.warning(
            "teach: %d teacher actor(s) × %g CPUs take all %g CPUs of the cluster; Ray Data's read tasks "
            "may then never be scheduled and the stage waits forever (seen with a text source on 2 CPUs). "
            "Leave a CPU free: lower teach.num_cpus or teach.concurrency",
            t.concurrency,
            t.num_cpus,
            total,
        )
    return source.dataset(index, read_blocks(t, source), **read).map_batches(
        TeacherActor,
        fn_constructor_kwargs={
            "teacher_cfg": tcfg.model_dump(),
            "device": "cuda" if t.num_gpus > 0 else "cpu",
            "digest": digest,
        },
        batch_size=t.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=t.concurrency),
        **remote,
    )


def _kdpipe_cause(e: BaseException) -> KdpipeError | None:
    """The KdpipeError (bad or changed source rows, …) behind Ray's exception wrappers, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KdpipeError):
            return e
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def teach_all(cfg: PipelineConfig, source: SourceData) -> dict[str, TeachResult]:
    """Every teacher of the spec into its cache (the fused cache, if any, is `kdpipe.fuse_stage`'s)."""
    return {t.id: teach_one(cfg, t, source) for t in cfg.teachers}

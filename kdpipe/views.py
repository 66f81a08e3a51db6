"""The datasets a distil run reads: source rows joined with every teacher cache, in Ray Data.

The join runs where the data is: the source index (and, for feature sources, the inputs read
by position) and each cache's Parquet parts are read by Ray Data and joined on `id` by Ray
Data's hash join; the result is prepared block by block (labels of unlabeled train rows hidden,
fixed-size lists turned into tensor columns, fp16 kept fp16) and materialised once per split in
the object store, so every epoch streams the same blocks and the driver never holds a row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kdpipe import storage
from kdpipe.arrays import find_sorted, id_keys, to_numpy
from kdpipe.cache import TeacherCache
from kdpipe.data import SourceData
from kdpipe.errors import KdpipeError
from kdpipe.lm.topk_codec import decode_batch

log = logging.getLogger("kdpipe.views")

SPLITS = ("train", "val", "test")
JOIN_PARTITION_BYTES = 64 << 20  # about this much data per hash-join partition (and output block)
BROADCAST_BYTES = 256 << 20  # a join side up to this size is broadcast to the workers instead of shuffled


@dataclass
class SplitViews:
    """Ray Datasets of the train/val/test rows: `label` (-1 where hidden) plus every numeric column
    the student and its losses may read (`x`, `<teacher>.<column>`)."""

    train: Any
    val: Any
    test: Any
    rows: dict[str, int]

    def __getitem__(self, split: str) -> Any:
        return getattr(self, split)


@dataclass
class Side:
    """One input of a join on `id`: a Ray Dataset, the bytes it holds (what the planner reads) and
    the prefix its columns other than `id` take in the joined rows (``<prefix>.<column>``). The
    prefix is applied where the side is consumed, not by a rename step of its own: on 2 CPUs a
    rename step between a backpressured read and the join actor could never get a CPU (the
    MiniLM views of 20,000 rows stalled for good that way)."""

    name: str
    ds: Any
    nbytes: int
    prefix: str | None = None


def prefixed(block: pa.Table, prefix: str | None) -> pa.Table:
    if not prefix:
        return block
    return block.rename_columns([c if c == "id" else f"{prefix}.{c}" for c in block.column_names])


def cache_side(tid: str, cache: TeacherCache, verify: bool = True) -> Side:
    """One teacher's cache: every part the manifest names (checksums verified first, a file at a
    time); its columns join as ``<tid>.<column>``."""
    import ray.data

    files = cache.files(verify=verify)
    if not files:
        raise KdpipeError(f"teacher cache {cache.dir} holds no rows; run `kdpipe teach SPEC` first")
    ds = ray.data.read_parquet([str(f) for f in files])
    return Side(tid, ds, sum(storage.size(str(f)) for f in files), prefix=tid)


def source_side(source: SourceData) -> Side:
    """The source index (+ the inputs `x` for feature sources, read by position in the workers;
    text students read the tokens their teacher cached)."""
    base = source.index_dataset()
    if source.input_kind == "features":
        cols = ["id", "label", "split", "labeled"] + (["file", "row"] if source.cfg is not None else [])
        return Side(
            "source", source.rows_dataset(base.select_columns(cols)), source.num_rows * (48 + 4 * (source.dim or 0))
        )
    return Side("source", base.select_columns(["id", "label", "split", "labeled"]), source.num_rows * 48)


def join_on_id(
    sides: list[Side], broadcast_bytes: int | None = None, then: Callable[[pa.Table], pa.Table] | None = None
) -> Any:
    """Inner join of `sides` on `id`, planned like a query engine plans it: the largest side
    streams; every other side small enough (`broadcast_bytes`, default `BROADCAST_BYTES`) is
    loaded once per worker and looked up by id (a broadcast join: no shuffle); larger sides are
    hash-joined by Ray Data (`Dataset.join`, a shuffle). No side passes through the driver.

    `then` (a block -> block function) runs on each joined block inside the lookup actor, not as
    a step of its own: on 2 CPUs a separate step after the actor could not get a CPU while the
    read and rename tasks upstream held both, backpressured, waiting for it (the MiniLM views of
    20,000 rows stalled that way, for good)."""
    limit = BROADCAST_BYTES if broadcast_bytes is None else broadcast_bytes
    ordered = sorted(sides, key=lambda s: -s.nbytes)
    stream, rest = ordered[0], ordered[1:]
    small = [s for s in rest if s.nbytes <= limit]
    large = [s for s in rest if s.nbytes > limit]
    out, prefix = stream.ds, stream.prefix
    if large:  # Ray Data's hash join needs distinct column names on its inputs: prefixed by a step of their own
        out, prefix = _with_prefix(out, prefix), None
        for side in large:
            parts = max(1, min(256, math.ceil(side.nbytes / JOIN_PARTITION_BYTES)))
            out = out.join(_with_prefix(side.ds, side.prefix), "inner", num_partitions=parts, on=("id",))
    if small:  # one actor looks up every small side: one process, a fraction of a CPU
        return out.map_batches(
            LookupJoin,
            fn_constructor_kwargs={
                "sides": [side_table(s.ds, s.prefix) for s in small],
                "prefix": prefix,
                "then": then,
            },
            batch_format="pyarrow",
            batch_size=None,
            compute=_one_actor(),
            num_cpus=0.5,
        )
    if prefix is None and then is None:
        return out
    return out.map_batches(
        _prefix_then, fn_kwargs={"prefix": prefix, "then": then}, batch_format="pyarrow", batch_size=None
    )


def _with_prefix(ds: Any, prefix: str | None) -> Any:
    return (
        ds
        if not prefix
        else ds.map_batches(prefixed, fn_kwargs={"prefix": prefix}, batch_format="pyarrow", batch_size=None)
    )


def _prefix_then(block: pa.Table, prefix: str | None, then: Callable[[pa.Table], pa.Table] | None) -> pa.Table:
    block = prefixed(block, prefix)
    return block if then is None else then(block)


def side_table(ds: Any, prefix: str | None = None) -> Any:
    """A small dataset as one Arrow table in the object store (columns prefixed), concatenated by a
    Ray task: the driver holds only the object ref."""
    import ray

    return ray.remote(num_cpus=0.25)(_concat).options(name="side_table").remote(prefix, *ds.to_arrow_refs())


def _concat(prefix: str | None, *tables: pa.Table) -> pa.Table:
    tables = tuple(t for t in tables if t.num_rows) or tables[:1]
    return prefixed(pa.concat_tables(tables, promote_options="default"), prefix)


def _one_actor() -> Any:
    import ray.data

    return ray.data.ActorPoolStrategy(size=1)


class LookupJoin:
    """`map_batches` callable: the small sides' rows for each id of a block (inner join). Each side
    is fetched once per actor and its ids sorted once, so a block costs a binary search per side."""

    def __init__(
        self, sides: list[Any], prefix: str | None = None, then: Callable[[pa.Table], pa.Table] | None = None
    ) -> None:
        import numpy as np
        import ray

        self.prefix, self.then = prefix, then
        self.sides = []
        for ref in sides:
            table = ray.get(ref)
            ids = id_keys(table["id"])
            order = np.argsort(ids, kind="stable")
            self.sides.append((ids[order], order, table.drop_columns(["id"])))

    def __call__(self, block: pa.Table) -> pa.Table:
        block = prefixed(block, self.prefix)
        for ids, order, table in self.sides:
            if len(ids) == 0:  # an empty side: no row joins, but the block keeps the side's columns
                block, rows = block.slice(0, 0), table.slice(0, 0)
            else:
                pos, found = find_sorted(ids, id_keys(block["id"]))
                block = block.filter(pa.array(found))
                rows = table.take(pa.array(order[pos[found]], pa.int64()))
            for name in rows.column_names:
                block = block.append_column(name, rows[name])
        return block if self.then is None else self.then(block)


def build_views(
    source: SourceData, caches: dict[str, TeacherCache], verify: bool = True, broadcast_bytes: int | None = None
) -> SplitViews:
    """The split datasets of a run: source ⋈ every cache on `id`, prepared and materialised."""
    sides = [source_side(source)] + [cache_side(tid, c, verify) for tid, c in caches.items()]
    joined = join_on_id(sides, broadcast_bytes, then=prepare_block).materialize()
    counts = _split_counts(joined)
    if sum(counts.values()) != source.num_rows:
        missing = source.num_rows - sum(counts.values())
        raise KdpipeError(
            f"teacher cache(s) {', '.join(str(c.dir) for c in caches.values())} lack {missing} of "
            f"{source.num_rows} source rows; run `kdpipe teach SPEC` first"
        )
    views = {
        s: joined.map_batches(_one_split, fn_kwargs={"split": s}, batch_format="pyarrow", batch_size=None).materialize()
        for s in SPLITS
    }
    token_teachers = [c.removesuffix(".topk_lm") for c in joined.columns() if c.endswith(".topk_lm")]
    del joined
    if token_teachers:  # compressed per-token top-k: decoded per batch, every epoch, in the workers
        views = {
            s: v.map_batches(
                decode_token_topk,
                fn_kwargs={"teachers": token_teachers},
                batch_format="pyarrow",
                batch_size=DECODE_BATCH,
            )
            for s, v in views.items()
        }
    log.info("distil views: %s rows (train/val/test)", "/".join(str(counts[s]) for s in SPLITS))
    return SplitViews(views["train"], views["val"], views["test"], counts)


def prepare_block(block: pa.Table) -> pa.Table:
    """Hide labels of train rows outside the labeled subset, drop `labeled`/`file`/`row`/`text`,
    and make fixed-size lists tensor columns (dtype kept: fp16 widens per batch in the worker)."""
    from ray.data.extensions import ArrowTensorArray

    hidden = pc.and_(pc.equal(block["split"], "train"), pc.invert(block["labeled"]))
    label = pc.if_else(hidden, pa.scalar(-1, pa.int64()), block["label"])
    cols: dict[str, Any] = {"split": block["split"], "label": label}
    for name in block.column_names:
        if name in ("id", "split", "label", "labeled", "file", "row", "text"):
            continue
        col = block[name]
        if pa.types.is_fixed_size_list(col.type):
            import numpy as np

            cols[name] = ArrowTensorArray.from_numpy(np.ascontiguousarray(to_numpy(col)))
        else:
            cols[name] = col
    return pa.table(cols)


DECODE_BATCH = 256  # sequences decoded at a time (≈ 256·T·k·12 bytes of decoded top-k)


def decode_token_topk(block: pa.Table, teachers: list[str]) -> pa.Table:
    """`<tid>.topk_lm` blobs -> `<tid>.topk_ids` (B, T, k) int64, `<tid>.topk_logp` (B, T, k) fp32 and
    `<tid>.tail_logp` (B, T) fp32 tensors (padding: logp -inf, all mass in the tail); the first
    teacher's tokens also become the batch's `input_ids` / `attention_mask`, which token losses read."""
    from ray.data.extensions import ArrowTensorArray

    cols = {c: block[c] for c in block.column_names if not c.endswith(".topk_lm")}
    for tid in teachers:
        seq_len = block[f"{tid}.input_ids"].type.shape[0]
        dec = decode_batch(block[f"{tid}.topk_lm"], seq_len)
        cols[f"{tid}.topk_ids"] = ArrowTensorArray.from_numpy(dec.ids)
        cols[f"{tid}.topk_logp"] = ArrowTensorArray.from_numpy(dec.logp)
        cols[f"{tid}.tail_logp"] = ArrowTensorArray.from_numpy(dec.tail_logp)
    first = teachers[0]
    cols["input_ids"], cols["attention_mask"] = block[f"{first}.input_ids"], block[f"{first}.attention_mask"]
    return pa.table(cols)


def _one_split(block: pa.Table, split: str) -> pa.Table:
    return block.filter(pc.equal(block["split"], split)).drop_columns(["split"])


def _split_counts(ds: Any) -> dict[str, int]:
    counts = {s: 0 for s in SPLITS}
    for row in ds.map_batches(_count_block, batch_format="pyarrow", batch_size=None).iter_rows():
        counts[row["split"]] += int(row["n"])
    return counts


def _count_block(block: pa.Table) -> pa.Table:
    vc = pc.value_counts(block["split"])
    return pa.table({"split": vc.field("values"), "n": vc.field("counts")})


def small_materialised(ds: Any, limit_bytes: float) -> bool:
    """Whether `ds` is materialised (its size known without a pass) and at most `limit_bytes` (0: never):
    small enough to be read whole where it is used instead of being split or scored by an actor."""
    from ray.data.dataset import MaterializedDataset

    return limit_bytes > 0 and isinstance(ds, MaterializedDataset) and ds.size_bytes() <= limit_bytes


def labeled_only(ds: Any, materialise: bool = False) -> Any:
    """The rows with a visible label (the baseline twin's training set): lazy, or materialised (a
    small view's filter, so that training can hand it to every worker whole like the views)."""
    out = ds.map_batches(_labeled_block, batch_format="pyarrow", batch_size=None)
    return out.materialize() if materialise else out


def _visible(block: pa.Table) -> Any:
    """The rows whose label the student may see (hidden labels are -1)."""
    return pc.greater_equal(block["label"], 0)


def _labeled_block(block: pa.Table) -> pa.Table:
    return block.filter(_visible(block))


def count_labeled(ds: Any) -> int:
    return int(
        sum(
            r["n"]
            for r in ds.map_batches(
                lambda b: pa.table({"n": [pc.sum(_visible(b)).as_py() or 0]}), batch_format="pyarrow", batch_size=None
            ).iter_rows()
        )
    )

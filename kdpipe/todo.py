"""The rows a cache still lacks, and the tally that proves a staged part holds exactly them.

A teach run (or a fusion) adds the source rows its cache does not hold. Both lists — the
source's ids and the cache's ids — grow with the data, so neither is read into the driver: the
source index is anti-joined with the cache's `id` column inside Ray Data, and what comes back
to the driver is an `IdTally` (a row count and an order-independent hash of the ids) per
block. The staged part is tallied the same way, a file at a time, so "every requested row
exactly once" is checked with a constant amount of driver memory however many rows there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import storage
from kdpipe.arrays import find_sorted, id_keys
from kdpipe.cache import TeacherCache, staged_files
from kdpipe.data import SourceData, id_multiset_hash

ID_BYTES = 40  # what one cached id costs, for planning the anti-join (20 hex chars + Arrow offsets, rounded up)
BROADCAST_ID_BYTES = 256 << 20  # cached ids up to this size are broadcast to the filter tasks; more are hash-joined
JOIN_PARTITION_BYTES = 64 << 20


@dataclass(frozen=True)
class IdTally:
    """How many ids, and their multiset hash: two tallies are equal when (up to 2**-64) they
    count the same ids the same number of times. Tallies of disjoint pieces add up."""

    rows: int = 0
    digest: int = 0

    @classmethod
    def of(cls, ids: pa.Array | pa.ChunkedArray) -> IdTally:
        return cls(len(ids), id_multiset_hash(ids))

    def __add__(self, other: IdTally) -> IdTally:
        return IdTally(self.rows + other.rows, (self.digest + other.digest) % 2**64)


@dataclass
class ToDo:
    """The index rows (id, label, split, labeled, file, row) a cache lacks, as a lazy Ray Dataset
    in read-sized blocks, and their tally. Re-running `index` gives the same rows while the
    cache's lock is held (the index file never changes, and nobody else commits)."""

    index: Any
    tally: IdTally

    @property
    def rows(self) -> int:
        return self.tally.rows


def rows_missing(source: SourceData, cache: TeacherCache, blocks: int, broadcast_bytes: int | None = None) -> ToDo:
    """The source rows `cache` does not hold yet (all of them for a new cache). Call it under
    the cache's lock."""
    index = source.index_dataset(blocks)
    if not cache.is_complete():  # every row: its tally was folded while the index was written
        return ToDo(index, IdTally(source.num_rows, source.ids_digest))
    index = drop_known_ids(index, cache, broadcast_bytes)
    return ToDo(index, tally_dataset(index))


def drop_known_ids(index: Any, cache: TeacherCache, broadcast_bytes: int | None = None) -> Any:
    """`index` without the rows whose id `cache` holds, planned like `views.join_on_id`: the
    cached ids are sorted once in a Ray task and broadcast to the filter tasks while they fit in
    `broadcast_bytes` (default `BROADCAST_ID_BYTES`); beyond that Ray Data hash-joins
    (`left_anti`, a shuffle)."""
    import ray
    import ray.data

    manifest = cache.manifest() or {}
    files = [str(f) for f in cache.files(verify=False)]
    if not files:
        return index
    have = ray.data.read_parquet(files, columns=["id"])
    nbytes = int(manifest.get("rows", 0)) * ID_BYTES
    if nbytes > (BROADCAST_ID_BYTES if broadcast_bytes is None else broadcast_bytes):
        parts = max(1, min(256, math.ceil(nbytes / JOIN_PARTITION_BYTES)))
        return index.join(have, "left_anti", num_partitions=parts, on=("id",))
    known = ray.remote(num_cpus=0.25)(_sorted_ids).options(name="cached_ids").remote(*have.to_arrow_refs())
    return index.map_batches(_drop_ids, fn_kwargs={"known": known}, batch_format="pyarrow", batch_size=None)


def _sorted_ids(*tables: pa.Table) -> np.ndarray:
    """The ids of `tables` as one sorted array of `views.id_keys` (a binary search per lookup)."""
    ids = [id_keys(t["id"]) for t in tables if t.num_rows]
    return np.sort(np.concatenate(ids)) if ids else np.zeros(0, "S1")


def _drop_ids(block: pa.Table, known: Any) -> pa.Table:
    import ray

    ids = ray.get(known) if isinstance(known, ray.ObjectRef) else known
    if len(ids) == 0 or block.num_rows == 0:
        return block
    _, found = find_sorted(ids, id_keys(block["id"]))
    return block.filter(pa.array(~found))


def tally_dataset(ds: Any) -> IdTally:
    """The tally of a dataset's `id` column, folded a block at a time in Ray Data: one row per
    block comes back to the driver."""
    total = IdTally()
    for row in ds.select_columns(["id"]).map_batches(_tally_block, batch_format="pyarrow", batch_size=None).iter_rows():
        total = total + IdTally(int(row["rows"]), int(row["digest"]))
    return total


def _tally_block(block: pa.Table) -> pa.Table:
    t = IdTally.of(block["id"])
    return pa.table({"rows": pa.array([t.rows], pa.int64()), "digest": pa.array([t.digest], pa.uint64())})


def tally_staged(staging: Any) -> IdTally:
    """The tally of a staged part, read one file at a time (only its `id` column)."""
    total = IdTally()
    for f in staged_files(staging):
        with storage.open_input(f) as fh:
            total = total + IdTally.of(pq.read_table(fh, columns=["id"])["id"])
    return total


def check_staged(staging: Any, want: IdTally) -> None:
    """Every requested row exactly once, before the part may be published."""
    got = tally_staged(staging)
    if got.rows > want.rows:
        raise RuntimeError(
            f"teach stage produced duplicate rows ({got.rows} rows for {want.rows} ids); the part was "
            "discarded, rerun `kdpipe teach`"
        )
    if got != want:
        raise RuntimeError(
            f"teach stage returned {got.rows} rows that are not the {want.rows} requested ones (rows "
            "missing or repeated); the part was discarded, rerun `kdpipe teach`"
        )

"""Join source rows with cached teacher outputs into the train/val/test tables the student sees."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdpipe.cache import TeacherCache
from kdpipe.config import KdpipeError


def join_teacher_outputs(base: pa.Table, caches: dict[str, TeacherCache], verify: bool = True) -> pa.Table:
    """Add ``<teacher_id>.<column>`` columns by id (index lookup: Arrow's hash join has no list columns)."""
    for tid, cache in caches.items():
        ct = cache.read(verify=verify)
        idx = pc.index_in(base["id"], value_set=ct["id"])
        missing = idx.null_count
        if missing:
            raise KdpipeError(
                f"teacher cache {cache.dir} lacks {missing} of {base.num_rows} rows; run `kdpipe teach SPEC` first"
            )
        sub = ct.drop_columns(["id"]).take(idx)
        for name in sub.column_names:
            base = base.append_column(f"{tid}.{name}", sub[name])
    return base


def hide_unlabeled(table: pa.Table) -> pa.Table:
    """The student never sees labels of train rows outside the labeled subset."""
    hidden = pc.and_(pc.equal(table["split"], "train"), pc.invert(table["labeled"]))
    label = pc.if_else(hidden, pa.scalar(-1, pa.int64()), table["label"])
    return table.set_column(table.schema.get_field_index("label"), "label", label)


def split_tables(table: pa.Table) -> dict[str, pa.Table]:
    return {s: table.filter(pc.equal(table["split"], s)) for s in ("train", "val", "test")}


def tensor_columns(table: pa.Table, drop: Iterable[str] = ("id", "split", "labeled", "text")) -> pa.Table:
    """Keep only numeric columns and turn fixed-size lists into Ray's tensor extension type,
    so `iter_torch_batches` yields 2-D tensors."""
    from ray.data.extensions import ArrowTensorArray

    from kdpipe.arrays import to_numpy

    cols = {}
    for name in table.column_names:
        if name in drop:
            continue
        col = table[name]
        if pa.types.is_fixed_size_list(col.type):
            arr = to_numpy(col)
            if arr.dtype == np.float16:
                arr = arr.astype(np.float32)
            cols[name] = ArrowTensorArray.from_numpy(np.ascontiguousarray(arr))
        else:
            cols[name] = col.combine_chunks()
    return pa.table(cols)


def labeled_only(table: pa.Table) -> pa.Table:
    return table.filter(pc.greater_equal(table["label"], 0))


def torch_batch(table: pa.Table) -> dict:
    """The numeric columns of a (small) table as one batch of torch tensors (driver-side eval)."""
    import torch

    from kdpipe.arrays import to_numpy

    out = {}
    for name in tensor_columns(table).column_names:
        out[name] = torch.from_numpy(np.array(to_numpy(table[name])))
        if out[name].dtype == torch.float16:
            out[name] = out[name].float()
    return out

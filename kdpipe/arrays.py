"""Arrow <-> numpy for fixed-size vectors: the only tensor format that crosses Ray and Parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def to_fixed_list(mat: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) numpy -> FixedSizeList<D>; float16 stays float16 (Parquet FLOAT16)."""
    mat = np.ascontiguousarray(mat)
    if mat.ndim != 2:
        mat = mat.reshape(mat.shape[0], -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])


def to_numpy(col: pa.ChunkedArray | pa.Array, dtype: np.dtype | type | None = None) -> np.ndarray:
    """FixedSizeList<D> (or a plain numeric column) -> (N, D) numpy."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        flat = col.flatten().to_numpy(zero_copy_only=False)
        out = flat.reshape(-1, width)
    else:
        out = col.to_numpy(zero_copy_only=False)
    return out.astype(dtype, copy=False) if dtype is not None else out


def id_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Ids as a numpy array of fixed-width bytes: the form the sorted-id lookups compare."""
    return np.asarray(ids.to_numpy(zero_copy_only=False)).astype("S")


def find_sorted(keys: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `want`, its position in the sorted, non-empty `keys` and whether it is there
    (a binary search each)."""
    pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    return pos, keys[pos] == want

"""Row checks and row ids: what makes a raw row usable, and the id that decides its split.

A row's id is a hash of its input (its feature vector's bytes, or its stripped UTF-8 text), or,
with `source.id_column`, of that column's value, which stays the same whatever the file format
(a float printed into a CSV cell may read back as another value than the Parquet file holds, and
so hash to another id). Labels are only normalised here (to text: an id such as "3", or a class
name); which labels are valid is decided once every row has been seen (`kdpipe.data.labels`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdpipe.spec import SourceConfig


def row_id(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:20]


def unit(salt: str, rid: str) -> float:
    """A row's position in [0, 1) under a salt: its split is a function of its id alone."""
    return int(hashlib.sha256(f"{salt}:{rid}".encode()).hexdigest()[:8], 16) / 2**32


def scalar_text(value: Any) -> str | None:
    """An id or label cell as text, the same whatever the format held it as: 17, 17.0 and "17" are
    "17"; None and "" are None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None if math.isnan(value) else str(value)
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).strip()
    return text or None


def key_id(key: str) -> str:
    """The row id of a row whose id column holds `key`."""
    return row_id(b"key:" + key.encode("utf-8"))


@dataclass
class Checked:
    """The good rows of one chunk (`pos` = offset in the chunk) and the bad ones with reasons."""

    pos: np.ndarray
    ids: list[str]
    labels: list[str | None]  # as text: an id or a class name; None = unlabeled
    keys: list[str | None]  # the id column's values (None without one)
    inputs: np.ndarray | list[str]  # (n, dim) float32 features, or texts
    bad: list[tuple[int, str, str]]  # (offset, reason, preview)
    dim: int | None


def _label_or_error(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, (list, dict, tuple)):
        return None, f"label {value!r:.60} is neither a class id nor a class name"
    if isinstance(value, float) and math.isnan(value):
        return None, None
    return scalar_text(value), None


def check_row(raw: dict[str, Any], cfg: SourceConfig, dim: int | None) -> tuple[dict[str, Any] | None, str | None]:
    """(clean row, None) or (None, reason)."""
    if "error" in raw:
        return None, raw["error"]
    label, why = _label_or_error(raw.get("label"))
    if why:
        return None, why
    key = scalar_text(raw.get("key")) if cfg.id_column else None
    if cfg.id_column and key is None:
        return None, f"field '{cfg.id_column}' (source.id_column) is empty: every row needs its id"
    if "x" in raw:
        if raw["x"] is None:
            return None, "features are null"
        try:
            x = np.asarray(raw["x"], dtype=np.float32)
        except (TypeError, ValueError):
            return None, "features are not numeric"
        if x.ndim != 1:
            return None, f"features must be a 1-D vector, got shape {x.shape}"
        if dim is not None and x.shape[0] != dim:
            return None, f"features have length {x.shape[0]}, expected {dim}"
        if not np.isfinite(x).all():
            return None, "features contain NaN or inf"
        return {"x": x, "label": label, "key": key, "id": key_id(key) if key else row_id(x.tobytes())}, None
    text = raw.get("text")
    if text is None:
        return None, "text is null"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None, "text is not valid UTF-8"
    if not isinstance(text, str):
        return None, f"text must be a string, got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None, "text is not valid UTF-8"
    text = text.strip()
    if not text:
        return None, "text is empty"
    if len(text) > cfg.max_text_chars:
        return None, f"text has {len(text)} characters, over source.max_text_chars={cfg.max_text_chars}"
    return {"text": text, "label": label, "key": key, "id": key_id(key) if key else row_id(text.encode("utf-8"))}, None


def numeric_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """A list column of numbers with one length and no nulls -> (n, d) float32; None otherwise."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        return None
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        return None
    if col.null_count or len(col) == 0:
        return None
    if pa.types.is_fixed_size_list(t):
        width = t.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy()
        if (lengths != lengths[0]).any():
            return None
        width = int(lengths[0])
    flat = col.flatten()
    if flat.null_count:
        return None
    return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(col), width)


def check_chunk(chunk: pa.Table | list[dict[str, Any]], cfg: SourceConfig, dim: int | None) -> Checked:
    """Validate and id one raw chunk. Numeric Arrow columns take a vectorised path; anything
    else goes row by row, so every bad row gets its own reason."""
    if isinstance(chunk, pa.Table) and "x" in chunk.column_names:
        mat = numeric_matrix(chunk["x"])
        if mat is not None and (dim is None or mat.shape[1] == dim):
            n = len(mat)
            labels_raw = chunk["label"].to_pylist() if "label" in chunk.column_names else [None] * n
            keys_raw = chunk["key"].to_pylist() if "key" in chunk.column_names else [None] * n
            errors = chunk["error"].to_pylist() if "error" in chunk.column_names else [None] * n
            finite = np.isfinite(mat).all(axis=1)
            pos, ids, labels, keys, bad = [], [], [], [], []
            for i in range(n):
                label, why = _label_or_error(labels_raw[i])
                key = scalar_text(keys_raw[i]) if cfg.id_column else None
                why = errors[i] or why or (None if finite[i] else "features contain NaN or inf")
                if cfg.id_column and key is None and not why:
                    why = f"field '{cfg.id_column}' (source.id_column) is empty: every row needs its id"
                if why:
                    bad.append((i, why, repr(mat[i].tolist())[:80]))
                    continue
                pos.append(i)
                labels.append(label)
                keys.append(key)
                ids.append(key_id(key) if key else row_id(mat[i].tobytes()))
            p = np.asarray(pos, np.int64)
            return Checked(p, ids, labels, keys, mat[p], bad, mat.shape[1])
    rows = chunk.to_pylist() if isinstance(chunk, pa.Table) else chunk
    if dim is None and rows and cfg.kind != "text":
        for r in rows:
            if "x" not in r:
                continue
            try:
                dim = int(np.asarray(r["x"], dtype=np.float32).shape[0])
                break
            except (TypeError, ValueError, IndexError, KeyError):
                continue
    pos, ids, labels, keys, inputs, bad = [], [], [], [], [], []
    for i, raw in enumerate(rows):
        row, why = check_row(raw, cfg, dim)
        if why is not None:
            bad.append((i, why, repr(raw.get("text", raw.get("x", "")))[:80]))
            continue
        assert row is not None
        pos.append(i)
        ids.append(row["id"])
        labels.append(row["label"])
        keys.append(row["key"])
        inputs.append(row["x"] if "x" in row else row["text"])
    features = cfg.features is not None or cfg.kind == "sklearn_digits"
    arr: np.ndarray | list[str] = (
        (np.stack(inputs) if inputs else np.zeros((0, dim or 0), np.float32)) if features else inputs
    )
    return Checked(np.asarray(pos, np.int64), ids, labels, keys, arr, bad, dim)

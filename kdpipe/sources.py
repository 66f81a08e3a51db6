"""Source rows: validated, id'd and split, streamed from the files rather than held in memory.

Every row gets a stable id (a hash of its input content), a split and a `labeled` flag that
depend only on that id, so appending data never moves an old row to another split and a
teacher cache keyed by id stays valid.

`load_source` makes one streaming pass that keeps only a small *index* per row (id, label,
split, where it lives: file number and row number). The inputs themselves are read again, by
position, where they are needed: `SourceData.dataset()` gives the teach stage a Ray Dataset whose
read tasks stream the wanted rows straight to the teacher actors (the driver never holds them),
`SourceData.table` materialises the full table for tests and small tools only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdpipe import storage
from kdpipe.arrays import to_fixed_list
from kdpipe.errors import KdpipeError
from kdpipe.spec import SourceConfig

CHUNK_ROWS = 8192  # rows per read chunk: bounds reader memory, big enough to vectorise checks


class BadInputError(KdpipeError, ValueError):
    """A row the pipeline cannot use; the message names the row and the fix."""


class SourceChangedError(KdpipeError):
    """A source file changed between the index pass and a later read."""


def row_id(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:20]


def _unit(salt: str, rid: str) -> float:
    return int(hashlib.sha256(f"{salt}:{rid}".encode()).hexdigest()[:8], 16) / 2**32


# ---------------------------------------------------------------- files and raw chunks


def _resolve_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    files = storage.files_under(path, suffixes)
    if not files:
        where = "" if storage.is_remote(path) else f" (relative to {os.getcwd()})"
        raise BadInputError(f"source.path '{path}' matches no {'/'.join(suffixes)} files; check the path{where}")
    return files


def list_files(cfg: SourceConfig) -> list[str]:
    """The source's files in read order; built-in sets are one pseudo-file each."""
    if cfg.kind == "sklearn_digits":
        return ["sklearn:digits"]
    if cfg.kind == "wordnet":
        return ["wordnet:"]
    assert cfg.path is not None
    suffix = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json"), "csv": (".csv",), "text": (".txt",)}[cfg.kind]
    return _resolve_files(cfg.path, suffix)


def _builtin(f: str) -> bool:
    """The pseudo-file of a built-in set (`sklearn:digits`, `wordnet:`), not a path or a URI."""
    return f in ("sklearn:digits", "wordnet:")


def _stamp(f: str) -> list[int]:
    """Size and mtime of a real file (what a later read checks to catch a file changed underneath)."""
    return [0, 0] if _builtin(f) else storage.stamp(f)


def _chunks(items: list[Any], start: int) -> Iterator[list[Any]]:
    for i in range(start, len(items), CHUNK_ROWS):
        yield items[i : i + CHUNK_ROWS]


def raw_chunks(cfg: SourceConfig, f: str, start: int = 0) -> Iterator[pa.Table | list[dict[str, Any]]]:
    """The raw rows of one file from row `start` on, CHUNK_ROWS at a time.

    A chunk is an Arrow table (columnar formats: fast, vectorised checks) or a list of dicts
    (JSON/CSV/text, whose cells may hold anything); keys are `x` or `text`, `label`, or `error`
    for a row that could not even be parsed.
    """
    if cfg.kind == "sklearn_digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)
        for i in range(start, len(x), CHUNK_ROWS):
            yield pa.table({"x": to_fixed_list(x[i : i + CHUNK_ROWS]), "label": pa.array(d.target[i : i + CHUNK_ROWS].astype(np.int64))})
        return
    if cfg.kind == "wordnet":
        from kdpipe.datasets.wordnet import read_wordnet

        rows, _ = read_wordnet(cfg)
        yield from _chunks([{"text": r["text"], "label": r["label"]} for r in rows], start)
        return
    if cfg.kind == "parquet":
        yield from _parquet_chunks(cfg, f, start)
        return
    buf: list[dict[str, Any]] = []
    for rec in _records(cfg, f, start):
        buf.append(rec)
        if len(buf) == CHUNK_ROWS:
            yield buf
            buf = []
    if buf:
        yield buf


def _parquet_chunks(cfg: SourceConfig, f: str, start: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(storage.open_input(f))
    names = pf.schema_arrow.names
    col = cfg.features or cfg.text
    for key, name in (("features" if cfg.features else "text", col), ("label", cfg.label)):
        if name and name not in names:
            raise BadInputError(f"{f}: column '{name}' (source.{key}) not found; columns are {sorted(names)}")
    cols = [c for c in (col, cfg.label) if c]
    first = 0
    for g in range(pf.num_row_groups):  # skip whole row groups before `start` without decoding them
        n = pf.metadata.row_group(g).num_rows
        if first + n <= start:
            first += n
            continue
        for batch in pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=[g], columns=cols):
            t = pa.Table.from_batches([batch])
            if first + t.num_rows > start:
                t = t.slice(max(0, start - first))
                out = {"x" if cfg.features else "text": t[col]}
                if cfg.label:
                    out["label"] = t[cfg.label]
                yield pa.table(out)
            first += batch.num_rows


def _records(cfg: SourceConfig, f: str, start: int) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines, CSV or text file, from row `start` on (rows before it are only counted)."""
    if cfg.kind == "text":
        for n, line in enumerate(_lines(f)):
            if n >= start:
                yield {"text": line, "label": None}
        return
    if cfg.kind == "jsonl":
        n = 0
        for lineno, line in enumerate(_lines(f), 1):
            if not line.strip():
                continue
            n += 1
            if n <= start:
                continue
            try:
                r = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield {"error": f"{f}:{lineno}: not valid JSON ({e})"}
                continue
            if not isinstance(r, dict):
                yield {"error": f"{f}:{lineno}: a JSON line must be an object, got {type(r).__name__}"}
                continue
            yield _pick(cfg, f, r)
        return
    with io.TextIOWrapper(storage.open_binary(f), newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for name, setting in ((cfg.features or cfg.text, "features" if cfg.features else "text"), (cfg.label, "label")):
            if name and name not in header:
                raise BadInputError(f"{f}: column '{name}' (source.{setting}) not found; columns are {sorted(header)}")
        for n, r in enumerate(reader):
            if n >= start:
                yield _pick(cfg, f, r, vector_cells=True)


def _lines(f: str) -> Iterator[bytes]:
    """Lines as `bytes.splitlines` cuts them (\\n, \\r\\n and a lone \\r all end a line), streamed
    a MB at a time (cut at the last \\n, so a \\r\\n never straddles two reads)."""
    rest = b""
    with storage.open_binary(f) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            buf = rest + chunk
            cut = buf.rfind(b"\n") + 1
            yield from buf[:cut].splitlines()
            rest = buf[cut:]
    yield from rest.splitlines()


def _pick(cfg: SourceConfig, f: str, r: dict[str, Any], vector_cells: bool = False) -> dict[str, Any]:
    """The configured fields of one JSON/CSV record. A record that lacks one, holds null there or
    has cells beyond the CSV header is a bad *row* (quarantined under `on_bad_rows: skip`), not a
    bad file: only a header without the column (CSV, Parquet) fails the file."""
    key, name = ("x", cfg.features) if cfg.features else ("text", cfg.text)
    fields = [(name, "features" if key == "x" else "text")] + ([(cfg.label, "label")] if cfg.label else [])
    keys = sorted(k for k in r if k is not None)
    if None in r:  # csv.DictReader files cells beyond the header under the key None
        return {"error": f"row has {len(r[None])} cell(s) more than the header's {len(keys)} columns"}
    for field_name, setting in fields:
        if field_name not in r:
            hint = " (write null for an unlabeled row)" if setting == "label" else ""
            return {"error": f"field '{field_name}' (source.{setting}) is missing{hint}; the row has {keys}"}
        if r[field_name] is None and (setting != "label" or vector_cells):
            # a JSON null label means "unlabeled"; CSV gives None only for a short row
            return {"error": f"field '{field_name}' (source.{setting}) is "
                             f"{'missing: the row has fewer cells than the header' if vector_cells else 'null'}"}
    row: dict[str, Any] = {"label": r.get(cfg.label) if cfg.label else None}
    row[key] = _parse_vector(r[name]) if vector_cells and key == "x" else r[name]
    return row


def _parse_vector(cell: Any) -> Any:
    """A CSV cell holding a vector: JSON (`[0.1, 0.2]`) or whitespace/comma separated numbers."""
    if not isinstance(cell, str):
        return cell
    text = cell.strip()
    try:
        return json.loads(text) if text.startswith("[") else [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        return cell  # reported by _check_row as "features are not numeric"


# ---------------------------------------------------------------- validation


def _check_label(label: Any, cfg: SourceConfig) -> tuple[int, str | None]:
    if label is None or label == "":
        return -1, None
    try:
        label_f = float(label)
    except (TypeError, ValueError):
        return -1, f"label {label!r} is not an integer"
    if not math.isfinite(label_f) or label_f != int(label_f) or label_f < 0:
        return -1, f"label {label!r} is not a non-negative integer"
    if cfg.num_classes is not None and label_f >= cfg.num_classes:
        return -1, f"label {int(label_f)} >= source.num_classes={cfg.num_classes}"
    return int(label_f), None


def _check_row(raw: dict[str, Any], cfg: SourceConfig, dim: int | None) -> tuple[dict[str, Any] | None, str | None]:
    """Return (clean row, None) or (None, reason)."""
    if "error" in raw:
        return None, raw["error"]
    label, why = _check_label(raw.get("label"), cfg)
    if why:
        return None, why
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
        return {"x": x, "label": label, "id": row_id(x.tobytes())}, None
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
    return {"text": text, "label": label, "id": row_id(text.encode("utf-8"))}, None


@dataclass
class Checked:
    """The good rows of one chunk (`pos` = offset in the chunk) and the bad ones with reasons."""

    pos: np.ndarray
    ids: list[str]
    labels: np.ndarray
    inputs: np.ndarray | list[str]  # (n, dim) float32 features, or texts
    bad: list[tuple[int, str, str]]  # (offset, reason, preview)
    dim: int | None


def _numeric_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
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
        mat = _numeric_matrix(chunk["x"])
        if mat is not None and (dim is None or mat.shape[1] == dim):
            labels_raw = chunk["label"].to_pylist() if "label" in chunk.column_names else [None] * len(mat)
            finite = np.isfinite(mat).all(axis=1)
            pos, ids, labels, bad = [], [], [], []
            for i in range(len(mat)):
                label, why = _check_label(labels_raw[i], cfg)
                why = why or (None if finite[i] else "features contain NaN or inf")
                if why:
                    bad.append((i, why, repr(mat[i].tolist())[:80]))
                    continue
                pos.append(i)
                labels.append(label)
                ids.append(row_id(mat[i].tobytes()))
            p = np.asarray(pos, np.int64)
            return Checked(p, ids, np.asarray(labels, np.int64), mat[p], bad, mat.shape[1])
    rows = chunk.to_pylist() if isinstance(chunk, pa.Table) else chunk
    if dim is None and rows and "x" in rows[0] and cfg.kind != "text":
        for r in rows:
            try:
                dim = int(np.asarray(r["x"], dtype=np.float32).shape[0])
                break
            except (TypeError, ValueError, IndexError, KeyError):
                continue
    pos, ids, labels, inputs, bad = [], [], [], [], []
    for i, raw in enumerate(rows):
        row, why = _check_row(raw, cfg, dim)
        if why is not None:
            bad.append((i, why, repr(raw.get("text", raw.get("x", "")))[:80]))
            continue
        assert row is not None
        pos.append(i)
        ids.append(row["id"])
        labels.append(row["label"])
        inputs.append(row["x"] if "x" in row else row["text"])
    features = cfg.features is not None or cfg.kind == "sklearn_digits"
    arr: np.ndarray | list[str] = (np.stack(inputs) if inputs else np.zeros((0, dim or 0), np.float32)) if features else inputs
    return Checked(np.asarray(pos, np.int64), ids, np.asarray(labels, np.int64), arr, bad, dim)


# ---------------------------------------------------------------- the source

INDEX_COLUMNS = ("id", "label", "split", "labeled", "file", "row")


@dataclass
class SourceData:
    """A validated source: a per-row index (id, label, split, labeled, file, row) and the inputs,
    read on demand by position.

    Built by `load_source`, the index lives in a Parquet file (`index_path`) that Ray Data reads,
    so the driver holds no rows; built from an in-memory `table` (tests, synthetic data), the
    table also serves as the index.
    """

    table_: pa.Table | None  # id, x | text, label, split, labeled — None until materialised
    input_kind: str  # "features" | "text"
    dim: int | None
    num_classes: int | None
    fingerprint: str
    files: list[str]
    bad_rows: int = 0
    quarantine_path: str | None = None
    split: dict[str, Any] = field(default_factory=dict)  # the split settings these rows were split with
    index_: pa.Table | None = None  # in-memory index (in-memory sources only)
    cfg: SourceConfig | None = None
    stamps: list[list[int]] = field(default_factory=list)
    index_path: str | None = None  # the index as Parquet (sources read from files)
    rows_: int | None = None
    ids_digest_: int | None = None  # sum of the ids' digests mod 2**64, folded while the index was written

    def __post_init__(self) -> None:
        if self.index_ is None and self.index_path is None:
            if self.table_ is None:
                raise ValueError("SourceData needs a table, an index or an index file")
            self.index_ = self.table_.select([c for c in ("id", "label", "split", "labeled") if c in self.table_.column_names])

    @property
    def index(self) -> pa.Table:
        """The whole index in memory: for tests and small tools, never for a pipeline stage."""
        if self.index_ is not None:
            return self.index_
        import pyarrow.parquet as pq

        assert self.index_path is not None
        with storage.open_input(self.index_path) as fh:
            return pq.read_table(fh)

    @property
    def ids_digest(self) -> int:
        """The multiset hash of every id (see `kdpipe.todo.IdTally`): what a new cache must hold."""
        if self.ids_digest_ is None:
            self.ids_digest_ = id_multiset_hash(self.index["id"])  # in-memory sources
        return self.ids_digest_

    @property
    def num_rows(self) -> int:
        if self.index_ is not None:
            return self.index_.num_rows
        assert self.rows_ is not None
        return self.rows_

    @property
    def table(self) -> pa.Table:
        """All rows with their inputs, in memory (tests and small tools; stages use `rows_dataset`)."""
        if self.table_ is None:
            assert self.cfg is not None
            index = self.index
            parts = list(read_rows(index.select(["file", "row", "id"]), self.cfg.model_dump(), self.files,
                                   self.stamps, self.dim))
            inputs = pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string())})
            cols = {"id": index["id"], self.input_column: inputs[self.input_column]}
            self.table_ = pa.table({**cols, **{c: index[c] for c in ("label", "split", "labeled")}})
        return self.table_

    @table.setter
    def table(self, value: pa.Table) -> None:
        self.table_ = value
        self.index_ = value.select([c for c in ("id", "label", "split", "labeled") if c in value.column_names])
        self.index_path, self.cfg, self.ids_digest_ = None, None, None

    @property
    def seekable(self) -> bool:
        """Whether a reader can start mid-file cheaply (Parquet row groups, in-memory sets). Line
        formats are scanned from the top by every read block, so they want few, large blocks."""
        return self.cfg is None or self.cfg.kind in ("parquet", "sklearn_digits")

    @property
    def input_column(self) -> str:
        return "x" if self.input_kind == "features" else "text"

    def rows(self, split: str) -> pa.Table:
        return self.table.filter(pc.equal(self.table["split"], split))

    def index_dataset(self, blocks: int | None = None) -> Any:
        """The index as a Ray Dataset: read from its Parquet file by Ray Data's reader (in-memory
        sources: from their table), so no stage needs the index in the driver."""
        import ray

        if self.index_ is not None:
            t = self.index_
            step = max(1, math.ceil(t.num_rows / (blocks or 8)))
            return ray.data.from_arrow([t.slice(i, step) for i in range(0, t.num_rows, step)] or [t])
        ds = ray.data.read_parquet(self.index_path)
        return ds.repartition(blocks) if blocks else ds

    def rows_dataset(self, positions: Any | None = None, **remote_args: Any) -> Any:
        """A Ray Dataset of `id` + input (+ any other index columns of `positions`, passed through)
        for the rows of `positions` (a Ray Dataset of index rows; default all).

        A `map_batches` read step turns positions into rows inside the workers, so the driver never
        holds the inputs. Give it the same `remote_args` (num_cpus, num_gpus) as the next stage and
        Ray Data fuses the read into it.
        """
        positions = self.index_dataset() if positions is None else positions
        if self.cfg is None:  # in-memory source: its table is the data
            return positions.map_batches(_attach_inputs, batch_size=None, batch_format="pyarrow",
                                         fn_kwargs={"table": self.table.select(["id", self.input_column])}, **remote_args)
        return positions.map_batches(
            read_rows, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"cfg": self.cfg.model_dump(), "files": self.files, "stamps": self.stamps, "dim": self.dim},
            **remote_args)

    @property
    def position_columns(self) -> list[str]:
        """The index columns `rows_dataset` reads inputs by: the file and row (in-memory: the id)."""
        return ["id"] if self.cfg is None else ["id", "file", "row"]

    def dataset(self, index: Any | None = None, blocks: int = 8, **remote_args: Any) -> Any:
        """`id` + input rows of the index rows `index` (a Ray Dataset, e.g. the rows a cache lacks;
        default every row in about `blocks` read blocks): the teach stage's input."""
        index = self.index_dataset(blocks) if index is None else index
        return self.rows_dataset(index.select_columns(self.position_columns), **remote_args)


def _attach_inputs(batch: pa.Table, table: pa.Table) -> pa.Table:
    """In-memory sources: the input of each id of `batch` (plus the batch's own columns)."""
    idx = pc.index_in(batch["id"], value_set=table["id"])
    col = [c for c in table.column_names if c != "id"][0]
    return batch.append_column(col, table[col].take(idx))


def read_rows(batch: pa.Table, cfg: dict[str, Any], files: list[str], stamps: list[list[int]],
              dim: int | None) -> Iterator[pa.Table]:
    """`map_batches` step: (file, row) positions -> `id` + input rows, a chunk at a time; other
    columns of `batch` (label, split, …) are passed through beside them."""
    scfg = SourceConfig.model_validate(cfg)
    extra = [c for c in batch.column_names if c not in ("file", "row", "id")]
    if batch.num_rows == 0:  # an empty block still has the output schema, so blocks concatenate
        features = scfg.features is not None or scfg.kind == "sklearn_digits"
        col = pa.array([], pa.list_(pa.float32(), dim or 0)) if features else pa.array([], pa.string())
        empty = pa.table({"id": pa.array([], pa.string()), "x" if features else "text": col})
        yield pa.table({**{c: empty[c] for c in empty.column_names}, **{c: batch[c] for c in extra}})
        return
    for fi in pc.unique(batch["file"]).to_pylist():
        sel = batch.filter(pc.equal(batch["file"], fi)).sort_by("row")
        changed = SourceChangedError(f"source file {files[fi]} no longer holds the rows it held when it was indexed; "
                                     "rerun (do not edit source files in place while a run reads them; add new files instead)")
        at = 0
        for out in read_file_rows(scfg, files[fi], stamps[fi] if stamps else None, sel["row"].to_numpy(), dim):
            want = sel.slice(at, out.num_rows)
            if not pc.all(pc.equal(out["id"], want["id"])).as_py():
                raise changed
            for c in extra:
                out = out.append_column(c, want[c])
            at += out.num_rows
            yield out
        if at != sel.num_rows:  # the file ended before the indexed rows did
            raise changed


def read_file_rows(cfg: SourceConfig, f: str, stamp: list[int] | None, rows: np.ndarray,
                   dim: int | None) -> Iterator[pa.Table]:
    """Given rows of one source file, re-validated into `id` + input, in row order."""
    if stamp is not None and _stamp(f) != stamp:
        raise SourceChangedError(f"source file {f} changed since the pipeline indexed it; rerun (do not edit source "
                                 "files in place while a run reads them; add new files instead)")
    rows = np.sort(rows)
    if len(rows) == 0:
        return
    first = int(rows[0])
    col = "x" if (cfg.features or cfg.kind == "sklearn_digits") else "text"
    for chunk in raw_chunks(cfg, f, first):
        n = chunk.num_rows if isinstance(chunk, pa.Table) else len(chunk)
        lo, hi = np.searchsorted(rows, [first, first + n])
        if hi > lo:
            offs = rows[lo:hi] - first
            sub = chunk.take(pa.array(offs)) if isinstance(chunk, pa.Table) else [chunk[int(o)] for o in offs]
            c = check_chunk(sub, cfg, dim)
            if c.bad:
                raise SourceChangedError(f"source file {f}: row {first + int(offs[c.bad[0][0]])} was good when indexed "
                                         f"and is now bad ({c.bad[0][1]}); rerun the pipeline")
            data = to_fixed_list(c.inputs) if col == "x" else pa.array(c.inputs, pa.string())
            yield pa.table({"id": pa.array(c.ids, pa.string()), col: data})
        first += n
        if first > rows[-1]:
            return


class _Quarantine:
    """Bad rows go to a side file as they are found (opened on the first one). A remote quarantine
    dir gets the file when the pass ends (written locally first: object stores do not append)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir, self.path, self.fh, self.count = str(directory), None, None, 0
        self.local: str | None = None

    def add(self, rec: dict[str, Any]) -> None:
        if self.fh is None:
            fname = f"bad-rows-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
            self.path = storage.join(self.dir, fname)
            if storage.is_remote(self.dir):
                self.local = os.path.join(tempfile.mkdtemp(prefix="kdpipe-quarantine-"), fname)
            else:
                Path(storage.local(self.dir)).mkdir(parents=True, exist_ok=True)
            self.fh = open(self.local or self.path, "w")
        self.fh.write(json.dumps(rec) + "\n")
        self.count += 1

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            if self.local is not None and self.path is not None:
                storage.upload(self.local, self.path)
                shutil.rmtree(os.path.dirname(self.local), ignore_errors=True)


RAW_SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()), ("file", pa.int32()), ("row", pa.int64()),
                        ("digest", pa.uint64())])
DEDUP_ROWS = 1 << 18  # ids de-duplicated per pass over the raw index: bounds that pass's memory (~10 MB)
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("label", pa.int64()), ("split", pa.string()), ("labeled", pa.bool_()),
                          ("file", pa.int32()), ("row", pa.int64())])


def load_source(cfg: SourceConfig, quarantine_dir: str | os.PathLike[str] = ".kdpipe/quarantine",
                index_dir: str | os.PathLike[str] | None = None) -> SourceData:
    """Two streaming passes that keep no rows in memory: validate and id every row into a raw
    index file, then de-duplicate and split it into the index file the stages read with Ray Data.

    Nothing is held per row: duplicates are found a bucket of ids at a time (`_duplicate_rows`),
    and only the positions of the duplicates themselves are kept.
    """
    if cfg.kind == "wordnet" or cfg.path:  # readers run in Ray workers: give them absolute paths (or URIs)
        from kdpipe.datasets.wordnet import WORDNET_DIR

        cfg = cfg.model_copy(update={"path": storage.normalize(cfg.path or WORDNET_DIR)})
    files = list_files(cfg)
    stamps = [_stamp(f) for f in files]
    features = cfg.features is not None or cfg.kind == "sklearn_digits"
    index_dir = str(index_dir) if index_dir is not None else storage.join(storage.parent(str(quarantine_dir)), "index")
    # built locally (a remote index dir gets the finished file as one object), read by Ray Data from index_dir
    work = Path(tempfile.mkdtemp(prefix="kdpipe-index-") if storage.is_remote(index_dir) else storage.local(index_dir))
    work.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), files, stamps]).encode()).hexdigest()[:16]
    stem = f".{key}-{os.getpid()}-{time.time_ns()}"
    raw, staged = work / f"{stem}.raw", work / f"{stem}.parquet"
    try:
        dim, bad, quarantine = _index_pass(cfg, files, features, quarantine_dir, raw)
        drop = _duplicate_rows(raw)
        stats = _split_pass(raw, staged, drop, cfg.split)
        if stats["rows"] == 0:
            raise BadInputError(f"source {cfg.kind} {cfg.path or ''} yielded no usable rows ({bad} bad)")
        path = storage.join(index_dir, f"index-{key}.parquet")
        storage.upload(staged, path)  # a rename locally (atomic: a concurrent run with the same key writes the same rows)
    finally:
        for f in (raw, staged):
            f.unlink(missing_ok=True)
        if storage.is_remote(index_dir):
            shutil.rmtree(work, ignore_errors=True)
    num_classes = cfg.num_classes or (stats["max_label"] + 1 if stats["max_label"] >= 0 else None)
    return SourceData(None, "features" if features else "text", dim, num_classes, stats["fingerprint"], files, bad,
                      quarantine, cfg.split.model_dump(), cfg=cfg, stamps=stamps, index_path=str(path), rows_=stats["rows"],
                      ids_digest_=stats["ids_digest"])


def _index_pass(cfg: SourceConfig, files: list[str], features: bool, quarantine_dir: str | os.PathLike[str],
                out: Path) -> tuple[int | None, int, str | None]:
    """Pass 1: every raw row checked, bad ones failed or quarantined, good ones written as
    (id, label, file, row, 64-bit digest of the id) to `out`. Returns the vector width, the bad
    row count and the quarantine file."""
    import pyarrow.parquet as pq

    q = _Quarantine(quarantine_dir)
    seen_raw, dim = 0, None
    writer = pq.ParquetWriter(out, RAW_SCHEMA)
    try:
        for fi, f in enumerate(files):
            row0 = 0
            for chunk in raw_chunks(cfg, f):
                n = chunk.num_rows if isinstance(chunk, pa.Table) else len(chunk)
                if cfg.limit and seen_raw + n > cfg.limit:
                    n = cfg.limit - seen_raw
                    chunk = chunk.slice(0, n) if isinstance(chunk, pa.Table) else chunk[:n]
                c = check_chunk(chunk, cfg, dim)
                dim = c.dim if features else None
                for off, why, preview in c.bad:
                    if cfg.on_bad_rows == "fail":
                        where = "" if _builtin(f) else f" (record {row0 + off} of {f}, from 0)"
                        raise BadInputError(f"bad input row {seen_raw + off}: {why}{where}. Fix the data, or set "
                                            "`source.on_bad_rows: skip` to quarantine bad rows")
                    q.add({"row": seen_raw + off, "file": f, "file_row": row0 + off, "reason": why, "preview": preview})
                writer.write_table(pa.table({"id": pa.array(c.ids, pa.string()), "label": pa.array(c.labels, pa.int64()),
                                             "file": pa.array(np.full(len(c.ids), fi, np.int32)),
                                             "row": pa.array(row0 + c.pos, pa.int64()),
                                             "digest": pa.array([id_digest(rid) for rid in c.ids], pa.uint64())},
                                            schema=RAW_SCHEMA))
                seen_raw += n
                row0 += n
                if cfg.limit and seen_raw >= cfg.limit:
                    break
            if cfg.limit and seen_raw >= cfg.limit:
                break
    finally:
        writer.close()
        q.close()
    return dim, q.count, q.path


def id_digest(rid: str) -> int:
    """A 64-bit digest of an id: the unit of de-duplication and of the ids' multiset hash."""
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little")


def id_multiset_hash(ids: pa.Array | pa.ChunkedArray) -> int:
    """Order-independent hash of a multiset of ids (sum of their digests, mod 2**64): equal for
    two id lists exactly when they hold the same ids the same number of times (up to 2**-64)."""
    return sum(id_digest(rid) for rid in ids.to_pylist()) % 2**64


def _duplicate_rows(raw: Path, rows_per_pass: int = DEDUP_ROWS) -> np.ndarray:
    """Positions (sorted) of the rows of `raw` whose id appeared earlier: identical inputs share one
    id and one teacher output, and the first occurrence is kept. Equal ids have equal digests, so
    they fall in the same bucket (digest mod passes): each pass reads only the digest column and
    sorts one bucket, about `rows_per_pass` ids, so memory does not grow with the source."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(raw)
    passes = max(1, math.ceil(pf.metadata.num_rows / rows_per_pass))
    drop: list[np.ndarray] = []
    for bucket in range(passes):
        digests, positions, at = [], [], 0
        for batch in pf.iter_batches(batch_size=65536, columns=["digest"]):
            d = batch.column(0).to_numpy()
            mine = np.flatnonzero(d % np.uint64(passes) == bucket) if passes > 1 else np.arange(len(d))
            digests.append(d[mine])
            positions.append(mine + at)
            at += len(d)
        if not digests:
            continue
        d, pos = np.concatenate(digests), np.concatenate(positions)
        order = np.argsort(d, kind="stable")  # positions ascend within the bucket: a repeat's first occurrence sorts first
        s = d[order]
        drop.append(pos[order[1:][s[1:] == s[:-1]]])
    return np.sort(np.concatenate(drop)) if drop else np.zeros(0, np.int64)


def _split_pass(raw: Path, out: Path, drop: np.ndarray, split: Any) -> dict[str, Any]:
    """Pass 2: the raw index without the duplicates, with each row's split and labeled flag, to
    `out`; also the source fingerprint (an order-independent multiset hash of id:label lines and
    the split settings), the row count and the largest label, all folded a batch at a time."""
    import pyarrow.parquet as pq

    total, ids, rows, max_label, at = 0, 0, 0, -1, 0
    with pq.ParquetWriter(out, INDEX_SCHEMA) as writer:
        for batch in pq.ParquetFile(raw).iter_batches(batch_size=65536):
            t = pa.Table.from_batches([batch])
            lo, hi = np.searchsorted(drop, [at, at + t.num_rows])
            if hi > lo:
                keep = np.ones(t.num_rows, bool)
                keep[drop[lo:hi] - at] = False
                t = t.filter(pa.array(keep))
            at += batch.num_rows
            sp, lab = [], []
            for rid, label in zip(t["id"].to_pylist(), t["label"].to_pylist()):
                u = _unit(split.salt, rid)
                s = "test" if u < split.test else ("val" if u < split.test + split.val else "train")
                sp.append(s)
                lab.append(s != "train" or _unit(split.salt + ":labeled", rid) < split.labeled_fraction)
                total += id_digest(f"{rid}:{label}")
            writer.write_table(pa.table({"id": t["id"], "label": t["label"], "split": pa.array(sp, pa.string()),
                                         "labeled": pa.array(lab, pa.bool_()), "file": t["file"], "row": t["row"]},
                                        schema=INDEX_SCHEMA))
            rows += t.num_rows
            ids = (ids + int(np.sum(t["digest"].to_numpy(), dtype=np.uint64))) % 2**64  # numpy's sum wraps mod 2**64
            if t.num_rows:
                max_label = max(max_label, int(pc.max(t["label"]).as_py()))
    h = hashlib.sha256(f"{total % 2**64}:{rows}".encode())
    h.update(json.dumps(split.model_dump(), sort_keys=True).encode())
    return {"rows": rows, "max_label": max_label, "fingerprint": h.hexdigest()[:16], "ids_digest": ids}

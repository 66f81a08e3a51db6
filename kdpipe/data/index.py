"""The source index: every usable row's id, label, split and place, in a Parquet file.

`load_source` makes two streaming passes that keep no rows in memory. The first reads every file
(`kdpipe.data.readers`), checks and ids every row (`kdpipe.data.checks`) and writes a raw index
(id, label as text, id-column value, file, row); the second drops repeated ids (identical inputs
share one id and are kept once; with `source.id_column`, a repeated value is a bad row), maps
labels to class ids (`kdpipe.data.labels`), and writes each row's split and `labeled` flag, which
depend only on its id, so appending data never moves an old row to another split.

The inputs themselves stay in the files and are read again, by position, where they are needed:
`SourceData.dataset()` gives the teach stage a Ray Dataset whose read tasks stream the wanted
rows straight to the teacher actors (the driver never holds them); `SourceData.table`
materialises the whole table for tests and small tools only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdpipe import storage
from kdpipe.arrays import to_fixed_list
from kdpipe.data import readers
from kdpipe.data.checks import check_chunk, unit
from kdpipe.data.labels import LabelMap
from kdpipe.data.readers import BadInputError
from kdpipe.datasets.wordnet import WORDNET_DIR
from kdpipe.errors import KdpipeError
from kdpipe.spec import SourceConfig

SPLITS = ("train", "val", "test")


class SourceChangedError(KdpipeError):
    """A source file changed between the index pass and a later read."""


def id_digest(rid: str) -> int:
    """A 64-bit digest of an id: the unit of de-duplication and of the ids' multiset hash."""
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little")


def id_multiset_hash(ids: pa.Array | pa.ChunkedArray) -> int:
    """Order-independent hash of a multiset of ids (sum of their digests, mod 2**64): equal for
    two id lists exactly when they hold the same ids the same number of times (up to 2**-64)."""
    return sum(id_digest(rid) for rid in ids.to_pylist()) % 2**64


# ---------------------------------------------------------------- the source


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
    class_names: list[str] | None = None  # labels given as names: id i is class_names[i]
    feature_columns: list[str] | None = None  # a wide table's feature columns, in input order
    split_rows: dict[str, int] = field(default_factory=dict)  # rows per split
    labeled_rows: dict[str, int] = field(default_factory=dict)  # rows with a visible label, per split

    def __post_init__(self) -> None:
        if self.index_ is None and self.index_path is None:
            if self.table_ is None:
                raise ValueError("SourceData needs a table, an index or an index file")
            self.index_ = self.table_.select(
                [c for c in ("id", "label", "split", "labeled") if c in self.table_.column_names]
            )

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
            parts = list(
                read_rows(
                    index.select(["file", "row", "id"]),
                    self.cfg.model_dump(),
                    self.files,
                    self.stamps,
                    self.dim,
                    self.feature_columns,
                )
            )
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
            return positions.map_batches(
                _attach_inputs,
                batch_size=None,
                batch_format="pyarrow",
                fn_kwargs={"table": self.table.select(["id", self.input_column])},
                **remote_args,
            )
        return positions.map_batches(
            read_rows,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={
                "cfg": self.cfg.model_dump(),
                "files": self.files,
                "stamps": self.stamps,
                "dim": self.dim,
                "columns": self.feature_columns,
            },
            **remote_args,
        )

    @property
    def position_columns(self) -> list[str]:
        """The index columns `rows_dataset` reads inputs by: the file and row (in-memory: the id)."""
        return ["id"] if self.cfg is None else ["id", "file", "row"]

    def dataset(self, index: Any | None = None, blocks: int = 8, **remote_args: Any) -> Any:
        """`id` + input rows of the index rows `index` (a Ray Dataset, e.g. the rows a cache lacks;
        default every row in about `blocks` read blocks): the teach stage's input."""
        index = self.index_dataset(blocks) if index is None else index
        return self.rows_dataset(index.select_columns(self.position_columns), **remote_args)

    def describe_rows(self) -> str:
        """`train 1078 (108 labeled), val 270, test 449`: what the console and the run say."""
        parts = []
        for s in SPLITS:
            n = self.split_rows.get(s)
            if n is None:
                continue
            lab = self.labeled_rows.get(s, 0)
            parts.append(f"{s} {n}" + (f" ({lab} labeled)" if s == "train" else ""))
        return ", ".join(parts)


def _attach_inputs(batch: pa.Table, table: pa.Table) -> pa.Table:
    """In-memory sources: the input of each id of `batch` (plus the batch's own columns)."""
    idx = pc.index_in(batch["id"], value_set=table["id"])
    col = [c for c in table.column_names if c != "id"][0]
    return batch.append_column(col, table[col].take(idx))


# ---------------------------------------------------------------- reading rows back by position


def read_rows(
    batch: pa.Table,
    cfg: dict[str, Any],
    files: list[str],
    stamps: list[list[int]],
    dim: int | None,
    columns: list[str] | None = None,
) -> Iterator[pa.Table]:
    """`map_batches` step: (file, row) positions -> `id` + input rows, a chunk at a time; other
    columns of `batch` (label, split, …) are passed through beside them."""
    scfg = SourceConfig.model_validate(cfg)
    extra = [c for c in batch.column_names if c not in ("file", "row", "id")]
    if batch.num_rows == 0:  # an empty block still has the output schema, so blocks concatenate
        features = readers.is_vector_features(scfg)
        col = pa.array([], pa.list_(pa.float32(), dim or 0)) if features else pa.array([], pa.string())
        empty = pa.table({"id": pa.array([], pa.string()), "x" if features else "text": col})
        yield pa.table({**{c: empty[c] for c in empty.column_names}, **{c: batch[c] for c in extra}})
        return
    for fi in pc.unique(batch["file"]).to_pylist():
        sel = batch.filter(pc.equal(batch["file"], fi)).sort_by("row")
        changed = SourceChangedError(
            f"source file {files[fi]} no longer holds the rows it held when it was indexed; "
            "rerun (do not edit source files in place while a run reads them; add new files instead)"
        )
        at = 0
        for out in read_file_rows(scfg, files[fi], stamps[fi] if stamps else None, sel["row"].to_numpy(), dim, columns):
            want = sel.slice(at, out.num_rows)
            if not pc.all(pc.equal(out["id"], want["id"])).as_py():
                raise changed
            for c in extra:
                out = out.append_column(c, want[c])
            at += out.num_rows
            yield out
        if at != sel.num_rows:  # the file ended before the indexed rows did
            raise changed


def read_file_rows(
    cfg: SourceConfig,
    f: str,
    stamp: list[int] | None,
    rows: np.ndarray,
    dim: int | None,
    columns: list[str] | None = None,
) -> Iterator[pa.Table]:
    """Given rows of one source file, re-validated into `id` + input, in row order."""
    if stamp is not None and readers.stamp(f) != stamp:
        raise SourceChangedError(
            f"source file {f} changed since the pipeline indexed it; rerun (do not edit source "
            "files in place while a run reads them; add new files instead)"
        )
    rows = np.sort(rows)
    if len(rows) == 0:
        return
    first = int(rows[0])
    col = "x" if readers.is_vector_features(cfg) else "text"
    for chunk in readers.raw_chunks(cfg, f, first, columns):
        n = chunk.num_rows if isinstance(chunk, pa.Table) else len(chunk)
        lo, hi = np.searchsorted(rows, [first, first + n])
        if hi > lo:
            offs = rows[lo:hi] - first
            sub = chunk.take(pa.array(offs)) if isinstance(chunk, pa.Table) else [chunk[int(o)] for o in offs]
            c = check_chunk(sub, cfg, dim)
            if c.bad:
                raise SourceChangedError(
                    f"source file {f}: row {first + int(offs[c.bad[0][0]])} was good when indexed "
                    f"and is now bad ({c.bad[0][1]}); rerun the pipeline"
                )
            data = to_fixed_list(c.inputs) if col == "x" else pa.array(c.inputs, pa.string())
            yield pa.table({"id": pa.array(c.ids, pa.string()), col: data})
        first += n
        if first > rows[-1]:
            return


# ---------------------------------------------------------------- bad rows


class Quarantine:
    """Bad rows go to a side file as they are found (opened on the first one). A remote quarantine
    dir gets the file when the passes end (written locally first: object stores do not append).
    With `on_bad_rows: fail` the first bad row stops the load with its place and reason."""

    def __init__(self, directory: str | os.PathLike[str], cfg: SourceConfig) -> None:
        self.dir, self.cfg = str(directory), cfg
        self.path: str | None = None
        self.fh: Any = None
        self.local: str | None = None
        self.count = 0

    def bad(self, row: int | None, f: str, file_row: int, reason: str, preview: str) -> None:
        """A bad row: `row` counts every row read so far (None where only its file and record are known)."""
        if self.cfg.on_bad_rows == "fail":
            where = "" if readers.builtin(f) else f" (record {file_row} of {f}, from 0)"
            what = f"bad input row {row}" if row is not None else "bad input row"
            raise BadInputError(
                f"{what}: {reason}{where}. Fix the data, or set `source.on_bad_rows: skip` to quarantine bad rows"
            )
        self.add({"row": row, "file": f, "file_row": file_row, "reason": reason, "preview": preview})

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
            self.fh = None
            if self.local is not None and self.path is not None:
                storage.upload(self.local, self.path)
                shutil.rmtree(os.path.dirname(self.local), ignore_errors=True)


# ---------------------------------------------------------------- the two passes

RAW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.string()),
        ("key", pa.string()),
        ("file", pa.int32()),
        ("row", pa.int64()),
        ("seq", pa.int64()),
        ("digest", pa.uint64()),
    ]
)
DEDUP_ROWS = 1 << 18  # ids de-duplicated per pass over the raw index: bounds that pass's memory (~10 MB)
INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int64()),
        ("split", pa.string()),
        ("labeled", pa.bool_()),
        ("file", pa.int32()),
        ("row", pa.int64()),
    ]
)


@dataclass
class IndexPass:
    """What the first pass learnt besides the raw index file."""

    dim: int | None = None
    columns: list[str] | None = None
    labels_seen: set[str] = field(default_factory=set)
    rows_read: int = 0


def load_source(
    cfg: SourceConfig,
    quarantine_dir: str | os.PathLike[str] = ".kdpipe/quarantine",
    index_dir: str | os.PathLike[str] | None = None,
) -> SourceData:
    """Two streaming passes that keep no rows in memory (see the module docstring)."""
    if cfg.kind == "wordnet" or cfg.path:  # readers run in Ray workers: give them absolute paths (or URIs)
        cfg = cfg.model_copy(update={"path": storage.normalize(cfg.path or WORDNET_DIR)})
    files = readers.list_files(cfg)
    stamps = [readers.stamp(f) for f in files]
    features = readers.is_vector_features(cfg)
    index_dir = str(index_dir) if index_dir is not None else storage.join(storage.parent(str(quarantine_dir)), "index")
    # built locally (a remote index dir gets the finished file as one object), read by Ray Data from index_dir
    work = Path(tempfile.mkdtemp(prefix="kdpipe-index-") if storage.is_remote(index_dir) else storage.local(index_dir))
    work.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), files, stamps]).encode()).hexdigest()[:16]
    stem = f".{key}-{os.getpid()}-{time.time_ns()}"
    raw, staged = work / f"{stem}.raw", work / f"{stem}.parquet"
    quarantine = Quarantine(quarantine_dir, cfg)
    try:
        first = _index_pass(cfg, files, features, quarantine, raw)
        labels = LabelMap.infer(cfg, first.labels_seen)
        repeats, firsts = duplicate_rows(raw)
        stats = _split_pass(raw, staged, repeats, firsts, cfg, labels, quarantine, files)
        if stats["rows"] == 0:
            raise BadInputError(f"source {cfg.kind} {cfg.path or ''} yielded no usable rows ({quarantine.count} bad)")
        path = storage.join(index_dir, f"index-{key}.parquet")
        storage.upload(
            staged, path
        )  # a rename locally (atomic: a concurrent run with the same key writes the same rows)
    finally:
        quarantine.close()
        for f in (raw, staged):
            f.unlink(missing_ok=True)
        if storage.is_remote(index_dir):
            shutil.rmtree(work, ignore_errors=True)
    num_classes = labels.num_classes or (stats["max_label"] + 1 if stats["max_label"] >= 0 else None)
    return SourceData(
        None,
        "features" if features else "text",
        first.dim,
        num_classes,
        stats["fingerprint"],
        files,
        quarantine.count,
        quarantine.path,
        cfg.split.model_dump(),
        cfg=cfg,
        stamps=stamps,
        index_path=str(path),
        rows_=stats["rows"],
        ids_digest_=stats["ids_digest"],
        class_names=list(labels.names) if labels.names is not None else None,
        feature_columns=first.columns,
        split_rows=stats["split_rows"],
        labeled_rows=stats["labeled_rows"],
    )


def _index_pass(cfg: SourceConfig, files: list[str], features: bool, quarantine: Quarantine, out: Path) -> IndexPass:
    """Pass 1: every raw row checked, bad ones failed or quarantined, good ones written as
    (id, label text, id-column value, file, row, 64-bit digest of the id) to `out`."""
    import pyarrow.parquet as pq

    state = IndexPass()
    writer = pq.ParquetWriter(out, RAW_SCHEMA)
    try:
        for fi, f in enumerate(files):
            if cfg.wide and state.columns is None:
                state.columns = readers.file_feature_columns(cfg, f)
            row0 = 0
            for chunk in readers.raw_chunks(cfg, f, 0, state.columns):
                n = chunk.num_rows if isinstance(chunk, pa.Table) else len(chunk)
                if cfg.limit and state.rows_read + n > cfg.limit:
                    n = cfg.limit - state.rows_read
                    chunk = chunk.slice(0, n) if isinstance(chunk, pa.Table) else chunk[:n]
                c = check_chunk(chunk, cfg, state.dim)
                state.dim = c.dim if features else None
                for off, why, preview in c.bad:
                    quarantine.bad(state.rows_read + off, f, row0 + off, why, preview)
                state.labels_seen.update(t for t in c.labels if t is not None)
                writer.write_table(
                    pa.table(
                        {
                            "id": pa.array(c.ids, pa.string()),
                            "label": pa.array(c.labels, pa.string()),
                            "key": pa.array(c.keys, pa.string()),
                            "file": pa.array(np.full(len(c.ids), fi, np.int32)),
                            "row": pa.array(row0 + c.pos, pa.int64()),
                            "seq": pa.array(state.rows_read + c.pos, pa.int64()),
                            "digest": pa.array([id_digest(rid) for rid in c.ids], pa.uint64()),
                        },
                        schema=RAW_SCHEMA,
                    )
                )
                state.rows_read += n
                row0 += n
                if cfg.limit and state.rows_read >= cfg.limit:
                    break
            if cfg.limit and state.rows_read >= cfg.limit:
                break
    finally:
        writer.close()
    return state


def duplicate_rows(raw: Path, rows_per_pass: int = DEDUP_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of the rows of `raw` whose id appeared earlier, and for each the position
    of that first occurrence. Equal ids have equal digests, so they fall in the same bucket
    (digest mod passes): each pass reads only the digest column and sorts one bucket, about
    `rows_per_pass` ids, so memory does not grow with the source."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(raw)
    passes = max(1, math.ceil(pf.metadata.num_rows / rows_per_pass))
    repeats: list[np.ndarray] = []
    firsts: list[np.ndarray] = []
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
        order = np.argsort(
            d, kind="stable"
        )  # positions ascend within the bucket: a repeat's first occurrence sorts first
        s, p = d[order], pos[order]
        same = np.concatenate([[False], s[1:] == s[:-1]])
        group_start = np.maximum.accumulate(np.where(~same, np.arange(len(s)), 0))
        repeats.append(p[same])
        firsts.append(p[group_start[same]])
    if not repeats:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rep, fst = np.concatenate(repeats), np.concatenate(firsts)
    order = np.argsort(rep)
    return rep[order], fst[order]


def _read_raw_rows(raw: Path, positions: np.ndarray) -> pa.Table:
    """The raw index rows at `positions` (a few: the first occurrences of repeated ids)."""
    import pyarrow.parquet as pq

    t = pq.read_table(raw, columns=["key", "file", "row"])
    return t.take(pa.array(positions)) if len(positions) else t.slice(0, 0)


def _split_pass(
    raw: Path,
    out: Path,
    repeats: np.ndarray,
    firsts: np.ndarray,
    cfg: SourceConfig,
    labels: LabelMap,
    quarantine: Quarantine,
    files: list[str],
) -> dict[str, Any]:
    """Pass 2: the raw index without repeated ids (a bad row each with `source.id_column`), labels
    mapped to class ids (a bad label is a bad row), each row's split and labeled flag, to `out`;
    also the source fingerprint (an order-independent multiset hash of id:label lines and the split
    settings), the row counts and the largest label, all folded a batch at a time."""
    import pyarrow.parquet as pq

    split = cfg.split
    first_rows = _read_raw_rows(raw, firsts) if cfg.id_column else None
    total, ids, rows, max_label, at = 0, 0, 0, -1, 0
    split_rows = {s: 0 for s in SPLITS}
    labeled_rows = {s: 0 for s in SPLITS}
    with pq.ParquetWriter(out, INDEX_SCHEMA) as writer:
        for batch in pq.ParquetFile(raw).iter_batches(batch_size=65536):
            t = pa.Table.from_batches([batch])
            keep = np.ones(t.num_rows, bool)
            lo, hi = np.searchsorted(repeats, [at, at + t.num_rows])
            if hi > lo:
                keep[repeats[lo:hi] - at] = False
                if cfg.id_column:
                    for r in range(lo, hi):
                        i = int(repeats[r] - at)
                        fr = first_rows.slice(int(r), 1).to_pylist()[0]
                        quarantine.bad(
                            t["seq"][i].as_py(),
                            files[t["file"][i].as_py()],
                            t["row"][i].as_py(),
                            f"source.id_column value {t['key'][i].as_py()!r} repeats the id of record "
                            f"{fr['row']} of {files[fr['file']]}",
                            str(t["key"][i].as_py()),
                        )
            texts = t["label"].to_pylist()
            mapped = np.full(t.num_rows, -1, np.int64)
            for i, text in enumerate(texts):
                if not keep[i]:
                    continue
                label, why = labels.lookup(text)
                if why:
                    keep[i] = False
                    quarantine.bad(
                        t["seq"][i].as_py(), files[t["file"][i].as_py()], t["row"][i].as_py(), why, str(text)
                    )
                mapped[i] = label
            at += batch.num_rows
            t = t.filter(pa.array(keep))
            mapped = mapped[keep]
            sp, lab = [], []
            for rid, label in zip(t["id"].to_pylist(), mapped.tolist()):
                u = unit(split.salt, rid)
                s = "test" if u < split.test else ("val" if u < split.test + split.val else "train")
                visible = s != "train" or unit(split.salt + ":labeled", rid) < split.labeled_fraction
                sp.append(s)
                lab.append(visible)
                split_rows[s] += 1
                labeled_rows[s] += int(visible and label >= 0)
                total += id_digest(f"{rid}:{label}")
            writer.write_table(
                pa.table(
                    {
                        "id": t["id"],
                        "label": pa.array(mapped, pa.int64()),
                        "split": pa.array(sp, pa.string()),
                        "labeled": pa.array(lab, pa.bool_()),
                        "file": t["file"],
                        "row": t["row"],
                    },
                    schema=INDEX_SCHEMA,
                )
            )
            rows += t.num_rows
            ids = (ids + int(np.sum(t["digest"].to_numpy(), dtype=np.uint64))) % 2**64  # numpy's sum wraps mod 2**64
            if t.num_rows:
                max_label = max(max_label, int(mapped.max()))
    h = hashlib.sha256(f"{total % 2**64}:{rows}".encode())
    h.update(json.dumps(split.model_dump(), sort_keys=True).encode())
    if labels.names is not None:  # the same ids under other class names are another source
        h.update(json.dumps(list(labels.names)).encode())
    return {
        "rows": rows,
        "max_label": max_label,
        "fingerprint": h.hexdigest()[:16],
        "ids_digest": ids,
        "split_rows": split_rows,
        "labeled_rows": labeled_rows,
    }

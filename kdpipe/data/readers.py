"""Readers: a source's files, and their raw rows a chunk at a time, in every format kdpipe reads.

A chunk is an Arrow table (columnar formats: fast, vectorised checks) or a list of dicts
(JSON-lines, CSV, text, whose cells may hold anything), with the keys every format shares:
``x`` (the numeric inputs: one vector per row) or ``text``, ``label`` (as the file holds it:
an integer id, a class name, or null), ``key`` (the `source.id_column` value, when one is set),
and ``error`` for a row that could not be read at all (with the reason).

Features come from one column holding a vector, or from several numeric columns (a wide table:
`features: [a, b, …]` or a selector). The columns are resolved against each file's header or
schema, in the same order for every file; a non-numeric feature column fails the file with a
message that says to encode it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdpipe import storage
from kdpipe.arrays import to_fixed_list
from kdpipe.datasets.wordnet import read_wordnet
from kdpipe.errors import KdpipeError
from kdpipe.spec import FeatureSelector, SourceConfig

CHUNK_ROWS = 8192  # rows per read chunk: bounds reader memory, big enough to vectorise checks
BUILTIN = ("sklearn:digits", "wordnet:")
SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json"), "csv": (".csv",), "text": (".txt",)}


class BadInputError(KdpipeError, ValueError):
    """Input the pipeline cannot use (a row, a column, a file); the message names it and the fix."""


def list_files(cfg: SourceConfig) -> list[str]:
    """The source's files in read order; built-in sets are one pseudo-file each."""
    if cfg.kind == "sklearn_digits":
        return ["sklearn:digits"]
    if cfg.kind == "wordnet":
        return ["wordnet:"]
    assert cfg.path is not None
    files = storage.files_under(cfg.path, SUFFIXES[cfg.kind])
    if not files:
        raise BadInputError(
            f"source.path '{cfg.path}' matches no {'/'.join(SUFFIXES[cfg.kind])} files; check the path "
            "(a relative path is relative to the spec file's folder)"
        )
    return files


def builtin(f: str) -> bool:
    """The pseudo-file of a built-in set (`sklearn:digits`, `wordnet:`), not a path or a URI."""
    return f in BUILTIN


def stamp(f: str) -> list[int]:
    """Size and mtime of a real file (what a later read checks to catch a file changed underneath)."""
    return [0, 0] if builtin(f) else storage.stamp(f)


def is_vector_features(cfg: SourceConfig) -> bool:
    """Numeric inputs (one vector per row), as opposed to text."""
    return cfg.features is not None or cfg.kind == "sklearn_digits"


# ---------------------------------------------------------------- the feature columns of a wide table


def feature_columns(cfg: SourceConfig, names: list[str], where: str) -> list[str] | None:
    """The feature columns of a wide source among a file's columns `names`, in the spec's order (a
    list) or the file's (a selector); None for a source with one vector column."""
    f = cfg.features
    if isinstance(f, list):
        missing = [c for c in f if c not in names]
        if missing:
            raise BadInputError(
                f"{where}: feature column(s) {missing} (source.features) not found; columns are {sorted(names)}"
            )
        return list(f)
    if isinstance(f, FeatureSelector):
        got = f.select([n for n in names if n not in (cfg.label, cfg.id_column)])
        if not got:
            raise BadInputError(
                f"{where}: source.features {f.model_dump(exclude_none=True, exclude_defaults=True)} "
                f"matches no column; columns are {sorted(names)}"
            )
        return got
    return None


def not_numeric(column: str, where: str, sample: Any) -> BadInputError:
    return BadInputError(
        f"{where}: feature column '{column}' (source.features) holds non-numeric values "
        f"(e.g. {sample!r}); kdpipe does not encode features: encode it as numbers first (one column "
        "per category, or category ids), or leave it out (a list without it, or `exclude:`)"
    )


def _numeric_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)


# ---------------------------------------------------------------- chunks


def raw_chunks(
    cfg: SourceConfig, f: str, start: int = 0, expect: list[str] | None = None
) -> Iterator[pa.Table | list[dict[str, Any]]]:
    """The raw rows of one file from row `start` on, CHUNK_ROWS at a time (see the module
    docstring); `expect` is the first file's feature columns, which every file must have."""
    if cfg.kind == "sklearn_digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)
        for i in range(start, len(x), CHUNK_ROWS):
            yield pa.table(
                {
                    "x": to_fixed_list(x[i : i + CHUNK_ROWS]),
                    "label": pa.array(d.target[i : i + CHUNK_ROWS].astype(np.int64)),
                }
            )
        return
    if cfg.kind == "wordnet":
        rows, _ = read_wordnet(cfg)
        items = [{"text": r["text"], "label": r["label"]} for r in rows]
        for i in range(start, len(items), CHUNK_ROWS):
            yield items[i : i + CHUNK_ROWS]
        return
    if cfg.kind == "parquet":
        yield from _parquet_chunks(cfg, f, start, expect)
        return
    buf: list[dict[str, Any]] = []
    for rec in _records(cfg, f, start, expect):
        buf.append(rec)
        if len(buf) == CHUNK_ROWS:
            yield buf
            buf = []
    if buf:
        yield buf


def file_feature_columns(cfg: SourceConfig, f: str) -> list[str] | None:
    """A wide source's feature columns as this file has them (its header or schema)."""
    if not cfg.wide or builtin(f):
        return None
    if cfg.kind == "parquet":
        import pyarrow.parquet as pq

        with storage.open_input(f) as fh:
            return feature_columns(cfg, pq.ParquetFile(fh).schema_arrow.names, f)
    if cfg.kind == "csv":
        with io.TextIOWrapper(storage.open_binary(f), newline="", encoding="utf-8", errors="surrogateescape") as fh:
            return feature_columns(cfg, next(csv.reader(fh), []), f)
    for line in _lines(f):  # JSON lines: the first record's keys
        if line.strip():
            try:
                first = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(first, dict):
                return feature_columns(cfg, list(first), f)
    return feature_columns(cfg, [], f)


def _check_same(f: str, got: list[str] | None, expect: list[str] | None) -> None:
    if expect is not None and got != expect:
        raise BadInputError(
            f"{f}: its feature columns {got} differ from the first file's {expect}; every file of a "
            "source must have the same feature columns"
        )


def _parquet_chunks(cfg: SourceConfig, f: str, start: int, expect: list[str] | None) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(storage.open_input(f))
    schema = pf.schema_arrow
    names = schema.names
    wide = feature_columns(cfg, names, f) if cfg.wide else None
    _check_same(f, wide, expect)
    one = None if wide is not None else (cfg.features or cfg.text)
    settings = [("features" if cfg.features else "text", one), ("label", cfg.label), ("id_column", cfg.id_column)]
    for key, name in settings:
        if name and name not in names:
            raise BadInputError(f"{f}: column '{name}' (source.{key}) not found; columns are {sorted(names)}")
    for c in wide or []:
        if not _numeric_type(schema.field(c).type):
            sample = pf.read_row_group(0, columns=[c])[c].drop_null()[:1].to_pylist() if pf.num_row_groups else []
            raise not_numeric(c, f, sample[0] if sample else str(schema.field(c).type))
    cols = list(dict.fromkeys([c for c in ([*(wide or []), one, cfg.label, cfg.id_column]) if c]))
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
                out: dict[str, Any] = {}
                if wide is not None:
                    out.update(_stack_columns(t, wide))
                else:
                    out["x" if cfg.features else "text"] = t[one]
                if cfg.label:
                    out["label"] = t[cfg.label]
                if cfg.id_column:
                    out["key"] = t[cfg.id_column]
                yield pa.table(out)
            first += batch.num_rows


def _stack_columns(t: pa.Table, columns: list[str]) -> dict[str, pa.Array]:
    """Numeric columns -> one float32 vector per row (`x`), and an `error` naming a null cell."""
    mat = np.empty((t.num_rows, len(columns)), np.float32)
    errors: list[str | None] = [None] * t.num_rows
    for j, c in enumerate(columns):
        col = t[c].combine_chunks() if isinstance(t[c], pa.ChunkedArray) else t[c]
        if pa.types.is_boolean(col.type) or pa.types.is_decimal(col.type):
            col = pc.cast(col, pa.float64())
        if col.null_count:
            for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)):
                errors[i] = errors[i] or f"feature '{c}' is null"
            col = col.fill_null(0)
        mat[:, j] = col.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    out: dict[str, pa.Array] = {"x": to_fixed_list(mat)}
    if any(errors):
        out["error"] = pa.array(errors, pa.string())
    return out


def _records(cfg: SourceConfig, f: str, start: int, expect: list[str] | None) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines, CSV or text file, from row `start` on (rows before it are only counted)."""
    if cfg.kind == "text":
        for n, line in enumerate(_lines(f)):
            if n >= start:
                yield {"text": line, "label": None}
        return
    wide = file_feature_columns(cfg, f) if cfg.wide else None
    _check_same(f, wide, expect)
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
            yield pick(cfg, r, wide)
        return
    with io.TextIOWrapper(storage.open_binary(f), newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        one = None if wide is not None else (cfg.features or cfg.text)
        for name, setting in (
            (one, "features" if cfg.features else "text"),
            (cfg.label, "label"),
            (cfg.id_column, "id_column"),
        ):
            if name and name not in header:
                raise BadInputError(f"{f}: column '{name}' (source.{setting}) not found; columns are {sorted(header)}")
        watch = TextColumns(f, wide or [])
        for n, r in enumerate(reader):
            watch.see(r, n)
            if n >= start:
                yield pick(cfg, r, wide, csv_cells=True)
        watch.done()


class TextColumns:
    """Watches a CSV's feature columns over its first rows: a column none of whose cells there
    parses as a number holds text, and fails the file with its name (a bad cell in a numeric
    column is a bad row)."""

    def __init__(self, f: str, columns: list[str], rows: int = CHUNK_ROWS) -> None:
        self.f, self.rows = f, rows
        self.pending = set(columns)
        self.sample: dict[str, Any] = {}

    def see(self, r: dict[str, Any], n: int) -> None:
        if not self.pending:
            return
        if n >= self.rows:
            self.done()
            return
        for c in list(self.pending):
            cell = r.get(c)
            if cell in (None, ""):
                continue
            try:
                float(cell)
                self.pending.discard(c)
            except (TypeError, ValueError):
                self.sample.setdefault(c, cell)

    def done(self) -> None:
        bad = [c for c in self.pending if c in self.sample]
        if bad:
            raise not_numeric(bad[0], self.f, self.sample[bad[0]])
        self.pending.clear()


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


def pick(cfg: SourceConfig, r: dict[str, Any], wide: list[str] | None, csv_cells: bool = False) -> dict[str, Any]:
    """The configured fields of one JSON/CSV record. A record that lacks one, holds null there or
    has cells beyond the CSV header is a bad *row* (quarantined under `on_bad_rows: skip`), not a
    bad file: only a header without the column (CSV, Parquet) fails the file."""
    keys = sorted(k for k in r if k is not None)
    if None in r:  # csv.DictReader files cells beyond the header under the key None
        return {"error": f"row has {len(r[None])} cell(s) more than the header's {len(keys)} columns"}
    row: dict[str, Any] = {}
    if wide is not None:
        x = []
        for c in wide:
            cell = r.get(c)
            if c not in r or cell is None or (csv_cells and cell == ""):
                short = csv_cells and cell is None
                return {
                    "error": f"feature '{c}' is "
                    + (
                        "missing: the row has fewer cells than the header"
                        if short
                        else "missing"
                        if c not in r
                        else "empty"
                        if cell == ""
                        else "null"
                    )
                }
            try:
                x.append(float(cell))
            except (TypeError, ValueError):
                return {"error": f"feature '{c}' is not a number ({str(cell)[:40]!r})"}
        row["x"] = x
    else:
        key, name = ("x", cfg.features) if cfg.features else ("text", cfg.text)
        setting = "features" if key == "x" else "text"
        if name not in r:
            return {"error": f"field '{name}' (source.{setting}) is missing; the row has {keys}"}
        if r[name] is None:
            return {
                "error": f"field '{name}' (source.{setting}) is "
                f"{'missing: the row has fewer cells than the header' if csv_cells else 'null'}"
            }
        row[key] = _parse_vector(r[name]) if csv_cells and key == "x" else r[name]
    if cfg.label:
        if cfg.label not in r:
            return {
                "error": f"field '{cfg.label}' (source.label) is missing (write null for an unlabeled row); "
                f"the row has {keys}"
            }
        if csv_cells and r[cfg.label] is None:
            return {"error": f"field '{cfg.label}' (source.label) is missing: the row has fewer cells than the header"}
        row["label"] = r[cfg.label]
    else:
        row["label"] = None
    if cfg.id_column:
        if r.get(cfg.id_column) in (None, ""):
            return {
                "error": f"field '{cfg.id_column}' (source.id_column) is "
                f"{'missing' if cfg.id_column not in r else 'empty'}: every row needs its id"
            }
        row["key"] = r[cfg.id_column]
    return row


def _parse_vector(cell: Any) -> Any:
    """A CSV cell holding a vector: JSON (`[0.1, 0.2]`) or whitespace/comma separated numbers."""
    if not isinstance(cell, str):
        return cell
    text = cell.strip()
    try:
        return json.loads(text) if text.startswith("[") else [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        return cell  # reported by the row check as "features are not numeric"

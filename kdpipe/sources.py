"""Readers that turn a spec's `source:` into one Arrow table of validated rows.

Every row gets a stable id (a hash of its input content), a split and a `labeled` flag that
depend only on that id, so appending data never moves an old row to another split and a
teacher cache keyed by id stays valid.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdpipe.arrays import to_fixed_list
from kdpipe.config import KdpipeError, SourceConfig


class BadInputError(KdpipeError, ValueError):
    """A row the pipeline cannot use; the message names the row and the fix."""


@dataclass
class SourceData:
    table: pa.Table  # id, x | text, label, split, labeled
    input_kind: str  # "features" | "text"
    dim: int | None
    num_classes: int | None
    fingerprint: str
    files: list[str]
    bad_rows: int = 0
    quarantine_path: str | None = None
    split: dict[str, Any] = field(default_factory=dict)  # the split settings these rows were split with

    def rows(self, split: str) -> pa.Table:
        return self.table.filter(pc.equal(self.table["split"], split))


def row_id(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:20]


def _unit(salt: str, rid: str) -> float:
    return int(hashlib.sha256(f"{salt}:{rid}".encode()).hexdigest()[:8], 16) / 2**32


def _resolve_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise BadInputError(f"source.path '{path}' matches no {'/'.join(suffixes)} files; check the path (relative to {os.getcwd()})")
    return files


def _read_raw(cfg: SourceConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows as python dicts with keys x/text/label, plus the files read."""
    if cfg.kind == "sklearn_digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)
        return [{"x": x[i], "label": int(d.target[i])} for i in range(len(x))], ["sklearn:digits"]
    if cfg.kind == "wordnet":
        from kdpipe.datasets.wordnet import read_wordnet

        return read_wordnet(cfg)
    assert cfg.path is not None
    if cfg.kind == "text":
        files = _resolve_files(cfg.path, (".txt",))
        rows: list[dict[str, Any]] = []
        for f in files:
            for line in Path(f).read_bytes().splitlines():
                rows.append({"text": line, "label": None})
        return rows, files
    suffix = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json"), "csv": (".csv",)}[cfg.kind]
    files = _resolve_files(cfg.path, suffix)
    rows = []
    for f in files:
        if cfg.kind == "parquet":
            import pyarrow.parquet as pq

            recs = pq.read_table(f).to_pylist()
        elif cfg.kind == "jsonl":
            recs = []
            for n, line in enumerate(Path(f).read_bytes().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    recs.append(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    recs.append({"__error__": f"{f}:{n}: not valid JSON ({e})"})
        else:
            import csv

            with open(f, newline="", encoding="utf-8", errors="surrogateescape") as fh:
                recs = list(csv.DictReader(fh))
        for r in recs:
            if "__error__" in r:
                rows.append({"error": r["__error__"]})
                continue
            if cfg.label and cfg.label not in r:
                raise BadInputError(f"{f}: column '{cfg.label}' (source.label) not found; columns are {sorted(r)}")
            row: dict[str, Any] = {"label": r.get(cfg.label) if cfg.label else None}
            if cfg.features:
                if cfg.features not in r:
                    raise BadInputError(
                        f"{f}: column '{cfg.features}' (source.features) not found; columns are {sorted(r)}"
                    )
                row["x"] = _parse_vector(r[cfg.features]) if cfg.kind == "csv" else r[cfg.features]
            else:
                if cfg.text not in r:
                    raise BadInputError(f"{f}: column '{cfg.text}' (source.text) not found; columns are {sorted(r)}")
                row["text"] = r[cfg.text]
            rows.append(row)
    return rows, files


def _parse_vector(cell: Any) -> Any:
    """A CSV cell holding a vector: JSON (`[0.1, 0.2]`) or whitespace/comma separated numbers."""
    if not isinstance(cell, str):
        return cell
    text = cell.strip()
    try:
        return json.loads(text) if text.startswith("[") else [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        return cell  # reported by _check_row as "features are not numeric"


def _check_row(raw: dict[str, Any], cfg: SourceConfig, dim: int | None) -> tuple[dict[str, Any] | None, str | None]:
    """Return (clean row, None) or (None, reason)."""
    if "error" in raw:
        return None, raw["error"]
    label = raw.get("label")
    if label is not None and label != "":
        try:
            label_f = float(label)
        except (TypeError, ValueError):
            return None, f"label {label!r} is not an integer"
        if not math.isfinite(label_f) or label_f != int(label_f) or label_f < 0:
            return None, f"label {label!r} is not a non-negative integer"
        if cfg.num_classes is not None and label_f >= cfg.num_classes:
            return None, f"label {int(label_f)} >= source.num_classes={cfg.num_classes}"
        label = int(label_f)
    else:
        label = -1
    if "x" in raw:
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


def load_source(cfg: SourceConfig, quarantine_dir: str | os.PathLike[str] = ".kdpipe/quarantine") -> SourceData:
    """Read, validate, dedupe and split the source rows."""
    raws, files = _read_raw(cfg)
    if cfg.limit:
        raws = raws[: cfg.limit]
    dim = None
    for r in raws:
        if "x" in r:
            try:
                dim = int(np.asarray(r["x"], dtype=np.float32).shape[0])
                break
            except (TypeError, ValueError, IndexError):
                continue
    good: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(raws):
        row, reason = _check_row(raw, cfg, dim)
        if reason is not None:
            bad.append({"row": i, "reason": reason, "preview": repr(raw.get("text", raw.get("x", "")))[:80]})
            if cfg.on_bad_rows == "fail":
                raise BadInputError(
                    f"bad input row {i}: {reason}. Fix the data, or set `source.on_bad_rows: skip` to quarantine bad rows"
                )
            continue
        if row["id"] in seen:  # identical input: one id, one teacher output
            continue
        seen.add(row["id"])
        good.append(row)
    if not good:
        raise BadInputError(f"source {cfg.kind} {cfg.path or ''} yielded no usable rows ({len(bad)} bad)")
    qpath = None
    if bad:
        Path(quarantine_dir).mkdir(parents=True, exist_ok=True)
        qpath = str(Path(quarantine_dir) / f"bad-rows-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl")
        with open(qpath, "w") as fh:
            for b in bad:
                fh.write(json.dumps(b) + "\n")
    ids = [r["id"] for r in good]
    s = cfg.split
    splits, labeled = [], []
    for rid in ids:
        u = _unit(s.salt, rid)
        sp = "test" if u < s.test else ("val" if u < s.test + s.val else "train")
        splits.append(sp)
        labeled.append(sp != "train" or _unit(s.salt + ":labeled", rid) < s.labeled_fraction)
    cols: dict[str, Any] = {"id": pa.array(ids, pa.string())}
    if "x" in good[0]:
        mat = np.stack([r["x"] for r in good])
        cols["x"] = to_fixed_list(mat)
        input_kind = "features"
    else:
        cols["text"] = pa.array([r["text"] for r in good], pa.string())
        input_kind = "text"
    labels = np.array([r["label"] for r in good], dtype=np.int64)
    cols["label"] = pa.array(labels)
    cols["split"] = pa.array(splits, pa.string())
    cols["labeled"] = pa.array(labeled, pa.bool_())
    table = pa.table(cols)
    num_classes = cfg.num_classes or (int(labels.max()) + 1 if (labels >= 0).any() else None)
    # what a retrain cycle compares: the rows, their labels and how they are split
    lines = sorted(f"{i}:{l}" for i, l in zip(ids, labels.tolist()))
    fp = hashlib.sha256(("\n".join(lines) + json.dumps(s.model_dump(), sort_keys=True)).encode()).hexdigest()[:16]
    return SourceData(table, input_kind, dim, num_classes, fp, files, len(bad), qpath, s.model_dump())

"""Source readers: stable ids and splits, bad rows fail with the row and reason, or are quarantined."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdpipe.config import SourceConfig
from kdpipe.data import BadInputError, load_source


def test_digits_ids_and_splits_are_stable() -> None:
    cfg = SourceConfig(kind="sklearn_digits", split={"labeled_fraction": 0.1})
    a, b = load_source(cfg), load_source(cfg)
    assert a.table.equals(b.table) and a.fingerprint == b.fingerprint
    assert a.dim == 64 and a.num_classes == 10 and a.input_kind == "features"
    n = a.table.num_rows
    assert n > 1700 and len(set(a.table["id"].to_pylist())) == n
    counts = {s: a.rows(s).num_rows for s in ("train", "val", "test")}
    assert 0.18 < counts["test"] / n < 0.32 and 0.10 < counts["val"] / n < 0.20
    train = a.rows("train")
    frac = sum(train["labeled"].to_pylist()) / train.num_rows
    assert 0.05 < frac < 0.15


def _write_jsonl(path, rows) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_appending_rows_keeps_old_splits(tmp_path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    _write_jsonl(d / "a.jsonl", [{"text": f"sentence number {i}"} for i in range(50)])
    cfg = SourceConfig(kind="jsonl", path=str(d), text="text", num_classes=2)
    before = load_source(cfg)
    _write_jsonl(d / "b.jsonl", [{"text": f"another sentence {i}"} for i in range(20)])
    after = load_source(cfg)
    old = dict(zip(before.table["id"].to_pylist(), before.table["split"].to_pylist()))
    new = dict(zip(after.table["id"].to_pylist(), after.table["split"].to_pylist()))
    assert after.table.num_rows == 70 and all(new[k] == v for k, v in old.items())
    assert before.fingerprint != after.fingerprint


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"x": [1.0, float("nan"), 0.0], "label": 1}, "NaN or inf"),
        ({"x": [1.0, 2.0], "label": 1}, "length 2, expected 3"),
        ({"x": ["a", "b", "c"], "label": 1}, "not numeric"),
        ({"x": [1.0, 2.0, 3.0], "label": "cat"}, "not an integer"),
    ],
)
def test_bad_feature_rows_fail_with_row_and_reason(tmp_path, row, reason) -> None:
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [{"x": [0.0, 1.0, 2.0], "label": 0}, row])
    cfg = SourceConfig(kind="jsonl", path=str(f), features="x", label="label")
    with pytest.raises(BadInputError, match=rf"row 1: .*{reason}.*on_bad_rows: skip"):
        load_source(cfg, tmp_path / "q")


def test_bad_text_rows_are_quarantined_with_skip(tmp_path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(
        b'{"text": "a fine sentence"}\n{"text": ""}\n{"text": "'
        + b"x" * 50
        + b'"}\n{"text": 5}\nnot json\n{"text": "ok too"}\n'
    )
    cfg = SourceConfig(kind="jsonl", path=str(f), text="text", on_bad_rows="skip", max_text_chars=40, num_classes=2)
    src = load_source(cfg, tmp_path / "q")
    assert src.table["text"].to_pylist() == ["a fine sentence", "ok too"]
    assert src.bad_rows == 4
    reasons = [json.loads(l)["reason"] for l in open(src.quarantine_path)]
    assert any("empty" in r for r in reasons) and any("max_text_chars" in r for r in reasons)
    assert any("must be a string" in r for r in reasons) and any("not valid JSON" in r for r in reasons)


def test_non_utf8_text_file_is_bad_input(tmp_path) -> None:
    f = tmp_path / "d.txt"
    f.write_bytes(b"good line\n\xff\xfe broken\n")
    with pytest.raises(BadInputError, match="row 1: text is not valid UTF-8"):
        load_source(SourceConfig(kind="text", path=str(f), num_classes=2), tmp_path / "q")


def test_missing_path_is_clear(tmp_path) -> None:
    with pytest.raises(BadInputError, match="matches no"):
        load_source(SourceConfig(kind="parquet", path=str(tmp_path / "nope"), features="x"))


def test_csv_vector_cells_and_missing_label_column(tmp_path) -> None:
    f = tmp_path / "d.csv"
    f.write_text('x,label\n"[0.5, 1.0, 2.0]",1\n0.1 0.2 0.3,0\n')
    src = load_source(SourceConfig(kind="csv", path=str(f), features="x", label="label"))
    assert src.table.num_rows == 2 and src.dim == 3 and sorted(src.table["label"].to_pylist()) == [0, 1]
    with pytest.raises(BadInputError, match="column 'lbl' \\(source.label\\) not found"):
        load_source(SourceConfig(kind="csv", path=str(f), features="x", label="lbl"))


def _digits_parquet(path, n: int, row_group: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    from kdpipe.arrays import to_fixed_list

    d = load_digits()
    x = (d.data[:n] / 16.0).astype(np.float32)
    pq.write_table(
        pa.table({"x": to_fixed_list(x), "label": pa.array(d.target[:n].astype(np.int64))}),
        path,
        row_group_size=row_group,
    )


def test_duplicates_are_found_a_bucket_at_a_time(tmp_path) -> None:
    """De-duplication reads the raw index's digests in passes that each sort one bucket: any
    number of passes finds exactly the repeats (each after its first occurrence)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdpipe.data.index import RAW_SCHEMA, duplicate_rows

    rng = np.random.default_rng(0)
    digests = rng.integers(0, 50, 300).astype(np.uint64) * np.uint64(2**40 + 7)  # many repeats
    raw = tmp_path / "raw.parquet"
    n = len(digests)
    pq.write_table(
        pa.table(
            {
                "id": [str(d) for d in digests],
                "label": pa.nulls(n, pa.string()),
                "key": pa.nulls(n, pa.string()),
                "file": np.zeros(n, np.int32),
                "row": np.arange(n),
                "seq": np.arange(n),
                "digest": digests,
            },
            schema=RAW_SCHEMA,
        ),
        raw,
        row_group_size=64,
    )
    first: dict[int, int] = {}
    want, want_first = [], []
    for i, d in enumerate(digests.tolist()):
        if d in first:
            want.append(i)
            want_first.append(first[d])
        first.setdefault(d, i)
    for rows_per_pass in (10**6, 64, 7):
        repeats, firsts = duplicate_rows(raw, rows_per_pass)
        assert repeats.tolist() == want and firsts.tolist() == want_first


def test_index_pass_keeps_no_inputs_and_rereads_exact_rows(tmp_path) -> None:
    """load_source keeps only the index; the table read back by position (across row groups and
    chunks) is the same rows, with duplicates of an input kept once."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import kdpipe.data.index as sources
    import kdpipe.data.readers as readers
    from kdpipe.data import id_multiset_hash

    f = tmp_path / "d.parquet"
    _digits_parquet(f, 900, row_group=128)
    t = pq.read_table(f)
    pq.write_table(pa.concat_tables([t, t.slice(0, 5)]), f, row_group_size=128)  # 5 exact duplicates at the end
    cfg = SourceConfig(kind="parquet", path=str(f), features="x", label="label")
    old_chunk = readers.CHUNK_ROWS
    readers.CHUNK_ROWS = 100  # many chunks per row group boundary
    try:
        src = load_source(cfg)
        assert src.table_ is None and "x" not in src.index.column_names
        assert src.num_rows == 900  # duplicates share an id and count once
        assert max(src.index["row"].to_pylist()) == 899  # ... and the first occurrence is the one kept
        assert src.ids_digest == id_multiset_hash(src.index["id"])  # folded while written: what a new cache must hold
        some = src.index.filter(pc.is_in(src.index["row"], value_set=pa.array([3, 250, 251, 899], pa.int64())))
        got = list(sources.read_file_rows(cfg, src.files[0], src.stamps[0], some["row"].to_numpy(), src.dim))
        rows = pa.concat_tables(got)
        assert rows["id"].to_pylist() == some["id"].to_pylist()
        full = src.table
    finally:
        readers.CHUNK_ROWS = old_chunk
    assert full.num_rows == 900
    assert full["x"].to_pylist() == t["x"].to_pylist()  # read back by position: every row, in file order


def test_file_changed_after_indexing_is_detected(tmp_path) -> None:
    from kdpipe.data import SourceChangedError

    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [{"text": f"row {i}"} for i in range(10)])
    src = load_source(SourceConfig(kind="jsonl", path=str(f), text="text", num_classes=2))
    _write_jsonl(f, [{"text": f"edited row {i}"} for i in range(10)])
    with pytest.raises(SourceChangedError, match="changed since the pipeline indexed it"):
        _ = src.table
    # an edit that keeps size and mtime (cp -p, coarse clocks) is caught by the ids
    import os

    g = tmp_path / "e.jsonl"
    _write_jsonl(g, [{"text": f"row {i}"} for i in range(10)])
    src = load_source(SourceConfig(kind="jsonl", path=str(g), text="text", num_classes=2))
    st = os.stat(g)
    _write_jsonl(g, [{"text": f"wor {i}"} for i in range(10)])
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(SourceChangedError, match="no longer holds the rows"):
        _ = src.table


def test_dataset_streams_rows_through_ray(tmp_path, ray_local) -> None:
    """The teach stage's input: Ray Data read tasks produce exactly the wanted rows (id + input)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    f = tmp_path / "d.parquet"
    _digits_parquet(f, 600, row_group=64)
    src = load_source(SourceConfig(kind="parquet", path=str(f), features="x", label="label"))
    index = src.index.slice(100, 300)
    want = index["id"]
    got = pa.concat_tables(
        [
            t
            for t in ray_local.get(src.dataset(ray_local.data.from_arrow(index), num_cpus=0.5).to_arrow_refs())
            if t.num_rows
        ]
    )
    assert sorted(got["id"].to_pylist()) == sorted(want.to_pylist())
    table = src.table.filter(pc.is_in(src.table["id"], value_set=want.combine_chunks()))
    by_id = dict(zip(table["id"].to_pylist(), table["x"].to_pylist()))
    assert all(by_id[i] == x for i, x in zip(got["id"].to_pylist(), got["x"].to_pylist()))


def test_read_step_is_fused_into_the_next_stage(tmp_path, ray_local) -> None:
    """Given the same resources, Ray Data fuses the position reader into the teacher-like actor
    stage: rows go from the file into the actor, not through separate read tasks."""
    import pyarrow as pa

    f = tmp_path / "d.parquet"
    _digits_parquet(f, 300, row_group=64)
    src = load_source(SourceConfig(kind="parquet", path=str(f), features="x", label="label"))

    class Passthrough:
        def __call__(self, batch: pa.Table) -> pa.Table:
            return batch

    ds = (
        src.dataset(None, blocks=2, num_cpus=0.5)
        .map_batches(
            Passthrough, batch_format="pyarrow", compute=ray_local.data.ActorPoolStrategy(size=1), num_cpus=0.5
        )
        .materialize()
    )
    assert ds.count() == 300
    assert "MapBatches(read_rows)->MapBatches(Passthrough)" in ds.stats()


def _write_bad_field_source(tmp_path, kind: str):
    """Four good rows and the bad ones each format can hold: a missing, null or extra field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [2.0, 0.5, 0.0], [3.0, 3.0, 3.0]]
    if kind == "jsonl":
        f = tmp_path / "d.jsonl"
        rows = [
            {"pixels": good[0], "digit": 1},
            {"digit": 4},
            {"pixels": good[1], "digit": 0},
            {"pixels": None, "digit": 2},
            {"pixels": good[2], "digit": 1, "extra": "ignored"},
            {"pixels": good[3]},
        ]  # no label key: a row without a label is bad too (label is configured)
        _write_jsonl(f, rows)
        return (
            f,
            {"features": "pixels", "label": "digit"},
            3,
            [
                "'pixels' (source.features) is missing",
                "'pixels' (source.features) is null",
                "'digit' (source.label) is missing",
            ],
        )
    if kind == "csv":
        f = tmp_path / "d.csv"
        f.write_text(
            'pixels,digit\n"[0, 1, 2]",1\n"[1, 1, 1]"\n"[1, 1, 1]",0\n"[2, 0.5, 0]",1,surplus\n"[3, 3, 3]",0\n'
        )
        return f, {"features": "pixels", "label": "digit"}, 3, ["fewer cells than the header", "more than the header"]
    if kind == "parquet":
        f = tmp_path / "d.parquet"
        x = pa.array([good[0], None, good[1], good[2]], pa.list_(pa.float32()))
        pq.write_table(pa.table({"pixels": x, "digit": pa.array([1, 4, 0, 1], pa.int64())}), f)
        return f, {"features": "pixels", "label": "digit"}, 3, ["features are null"]
    f = tmp_path / "d.txt"
    f.write_text("first line\n\nsecond line\n   \nthird line\n")
    return f, {}, 3, ["text is empty", "text is empty"]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "text"])
def test_a_row_missing_a_field_is_a_bad_row_not_a_bad_file(tmp_path, kind) -> None:
    """Issue 13: one row without the features key made the whole JSON-lines file fail, even with
    `on_bad_rows: skip`. In every format such a row is quarantined with its reason."""
    f, fields, n_good, reasons = _write_bad_field_source(tmp_path, kind)
    cfg = SourceConfig(kind=kind, path=str(f), on_bad_rows="skip", num_classes=10, **fields)
    src = load_source(cfg, tmp_path / "q")
    assert src.num_rows == n_good and src.bad_rows == len(reasons)
    got = [json.loads(line)["reason"] for line in open(src.quarantine_path)]
    assert all(any(r in g for g in got) for r in reasons), got
    with pytest.raises(BadInputError, match=r"bad input row \d+: .*on_bad_rows: skip"):
        load_source(cfg.model_copy(update={"on_bad_rows": "fail"}), tmp_path / "q2")


def test_a_header_without_the_column_fails_the_file(tmp_path) -> None:
    f = tmp_path / "d.csv"
    f.write_text('x,label\n"[0.5, 1.0, 2.0]",1\n')
    with pytest.raises(
        BadInputError, match=r"column 'pixels' \(source.features\) not found; columns are \['label', 'x'\]"
    ):
        load_source(SourceConfig(kind="csv", path=str(f), features="pixels", label="label"))

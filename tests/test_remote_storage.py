"""Source, teacher cache and Ray Train checkpoints in an object store (issue 11): a real
S3-compatible server process (moto's) on 127.0.0.1, and `kdpipe` run as a user runs it, with the
AWS_* variables pointing at it. Nothing may land on the local disk but the tracking store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, tiny_overrides
from tests.servers import BIN, S3Server


@pytest.fixture
def s3(tmp_path: Path):
    server = S3Server(tmp_path / "s3")
    yield server
    server.stop()


def _digits_rows(lo: int, hi: int) -> pa.Table:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[lo:hi] / 16.0).astype(np.float32)
    return pa.table(
        {
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64),
            "digit": pa.array(d.target[lo:hi].astype(np.int64)),
        }
    )


def _kdpipe(cmd: str, s3: S3Server, tmp: Path, overrides: dict) -> str:
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    env = {**os.environ, **s3.env, "RAY_ADDRESS": ""}
    out = subprocess.run(
        [str(BIN / "kdpipe"), cmd, str(ROOT / "pipelines" / "digits_kd.yaml"), *sets],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout + out.stderr


def _manifest(s3: S3Server, key: str) -> dict:
    fs = s3.filesystem()
    [cache] = [
        f.path
        for f in fs.get_file_info(pa.fs.FileSelector(f"{s3.bucket}/{key}", recursive=True))
        if f.base_name == "MANIFEST.json" and "/fused/" not in f.path
    ]
    with fs.open_input_stream(cache) as fh:
        return {**json.loads(fh.read()), "dir": cache.rsplit("/", 1)[0]}


@pytest.mark.slow  # ~65 s; tests/test_cluster.py runs the default pipeline on a bucket in the default suite
def test_teach_then_retrain_with_source_cache_and_checkpoints_in_a_bucket(tmp_path: Path, s3: S3Server) -> None:
    """`kdpipe teach` reads its source from s3:// and writes the cache there; new rows land in the
    bucket and `kdpipe retrain` teaches only them, as a second part of the same remote cache, then
    trains with Ray Train's checkpoints in the bucket and registers the student. Every cached id is
    held exactly once, and no row, index or checkpoint lands on the local disk."""
    fs, b = s3.filesystem(), s3.bucket
    pq.write_table(_digits_rows(0, 1200), f"{b}/data/digits-000.parquet", filesystem=fs)
    work = tmp_path / "work"
    work.mkdir()
    o = tiny_overrides(
        work,
        **{
            "source": {
                "kind": "parquet",
                "path": f"s3://{b}/data",
                "features": "pixels",
                "label": "digit",
                "split": {"val": 0.15, "test": 0.25, "labeled_fraction": 0.1},
            },
            "storage": f"s3://{b}/kd",
            "evaluate.baseline": False,
            "train.epochs": 3,
            "teachers.0.params.epochs": 20,
        },
    )
    _kdpipe("teach", s3, work, o)
    m1 = _manifest(s3, "kd/cache")
    assert [p["rows"] for p in m1["parts"]] == [1200] and m1["rows"] == 1200

    pq.write_table(_digits_rows(1200, 1797), f"{b}/data/digits-001.parquet", filesystem=fs)
    out = _kdpipe("retrain", s3, work, o)
    assert "registered" in out.lower(), out[-2000:]
    m2 = _manifest(s3, "kd/cache")
    assert m2["dir"] == m1["dir"], "the retrain wrote another cache instead of a part of the same one"
    assert [p["rows"] for p in m2["parts"]] == [1200, 597], m2["parts"]  # the 597 new images (digits has no duplicates)
    ids = []
    for part in m2["parts"]:
        for f in part["files"]:
            with fs.open_input_file(f"{m2['dir']}/{f['path']}") as fh:
                ids += pq.read_table(fh, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 1797

    ckpts = fs.get_file_info(pa.fs.FileSelector(f"{b}/kd/ray_results", recursive=True))
    assert any("checkpoint" in f.path for f in ckpts), "no Ray Train checkpoint in the bucket"
    assert fs.get_file_info(pa.fs.FileSelector(f"{b}/kd/index")), "the source index is not beside the cache"
    local_rows = [p for p in work.rglob("*.parquet")]
    assert not local_rows and not (work / ".kdpipe" / "cache").exists(), f"rows landed on local disk: {local_rows}"


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3


def _write(loc: str, table: pa.Table) -> None:
    from kdpipe import storage

    fs, path = storage.resolve(loc)
    pq.write_table(table, path, filesystem=fs)


def test_remote_cache_publishes_parts_only_through_its_manifest(s3_env: S3Server) -> None:
    """Object stores have no rename: a part is written in place under parts/ and exists only once
    the manifest (one object, written whole) names it. A failed run leaves neither; a second run
    adds a part; a flipped byte or a missing file is caught, as on a local disk."""
    from kdpipe import storage
    from kdpipe.cache import CacheCorruptError, cache_at

    b = s3_env.bucket
    cache = cache_at(f"s3://{b}/cache", "t", "fp")
    assert cache.remote and cache.dir == f"s3://{b}/cache/t/fp" and not cache.is_complete()
    header = {"teacher_id": "t", "fingerprint": "fp"}

    with pytest.raises(RuntimeError, match="teacher crashed"):
        with cache.staging() as st:
            _write(f"{st}/a.parquet", pa.table({"id": ["x"]}))
            raise RuntimeError("teacher crashed")
    assert not cache.is_complete() and storage.files_under(f"s3://{b}/cache", (".parquet",)) == []

    for lo, hi in ((0, 10), (10, 15)):
        with cache.staging() as st:
            _write(f"{st}/rows.parquet", pa.table({"id": [f"r{i}" for i in range(lo, hi)], "v": list(range(lo, hi))}))
            m = cache.commit(st, header, "src")
    assert [p["rows"] for p in m["parts"]] == [10, 5] and m["rows"] == 15
    assert sorted(cache.id_array().to_pylist()) == sorted(f"r{i}" for i in range(15))
    assert cache.read(["v"])["v"].to_pylist() == list(range(15))

    first = str(cache.files()[0])
    data = bytearray(storage.open_input(first).read())
    data[len(data) // 3] ^= 0xFF  # same size, one byte inside the data
    with storage.resolve(first)[0].open_output_stream(storage.resolve(first)[1]) as fh:
        fh.write(bytes(data))
    with pytest.raises(CacheCorruptError, match="checksum"):
        cache.files()
    storage.resolve(first)[0].delete_file(storage.resolve(first)[1])
    with pytest.raises(CacheCorruptError, match="missing"):
        cache.files(verify=False)


def test_remote_source_is_indexed_and_its_bad_rows_quarantined_in_the_bucket(s3_env: S3Server) -> None:
    """A JSON-lines source in a bucket (a glob over its files): rows are validated and id'd from the
    bucket, a bad row is quarantined with its reason beside the index, in the bucket; the index reads
    back; a path that matches nothing names the URI."""
    from kdpipe import storage
    from kdpipe.config import SourceConfig
    from kdpipe.data import BadInputError, load_source

    b = s3_env.bucket
    good = [{"text": f"gloss number {i}", "label": i % 3} for i in range(20)]
    lines = [json.dumps(r) for r in good[:12]] + ['{"label": 1}'] + [json.dumps(r) for r in good[12:]]
    storage.write_text(f"s3://{b}/src/a.jsonl", "\n".join(lines[:10]) + "\n")
    storage.write_text(f"s3://{b}/src/b.jsonl", "\n".join(lines[10:]) + "\n")
    storage.write_text(f"s3://{b}/src/notes.txt", "not a source file\n")
    cfg = SourceConfig(kind="jsonl", path=f"s3://{b}/src/*.jsonl", text="text", label="label", on_bad_rows="skip")
    src = load_source(cfg, f"s3://{b}/kd/quarantine")
    assert src.files == [f"s3://{b}/src/a.jsonl", f"s3://{b}/src/b.jsonl"]
    assert src.num_rows == 20 and src.bad_rows == 1
    assert src.index_path.startswith(f"s3://{b}/kd/index/") and src.index.num_rows == 20
    assert src.quarantine_path.startswith(f"s3://{b}/kd/quarantine/")
    [bad] = [json.loads(line) for line in storage.read_text(src.quarantine_path).splitlines()]
    assert bad["file"] == f"s3://{b}/src/b.jsonl" and "field 'text' (source.text) is missing" in bad["reason"]
    with pytest.raises(BadInputError, match=f"s3://{b}/nothing"):
        load_source(SourceConfig(kind="jsonl", path=f"s3://{b}/nothing", text="text"), f"s3://{b}/kd/quarantine")


@pytest.mark.slow  # two teach runs of their own Ray (~40 s)
def test_teacher_weights_in_a_bucket_are_fetched_once_per_node(tmp_path: Path, s3: S3Server) -> None:
    """Two teacher actors on one node load the teacher kdpipe trained into the bucket: one download
    into the node's cache (keyed by the weights' digest), shared by both; a later run on the same
    node downloads nothing."""
    fs, b = s3.filesystem(), s3.bucket
    pq.write_table(_digits_rows(0, 900), f"{b}/once/data/a.parquet", filesystem=fs)
    work = tmp_path / "work"
    work.mkdir()
    node_cache = tmp_path / "node-cache"
    o = tiny_overrides(
        work,
        **{
            "source": {"kind": "parquet", "path": f"s3://{b}/once/data", "features": "pixels", "label": "digit"},
            "storage": f"s3://{b}/once/kd",
            "teach.concurrency": 2,
            "teach.num_cpus": 0.5,
            "teach.batch_size": 64,
        },
    )
    sets = [a for k, v in o.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    env = {**os.environ, **s3.env, "RAY_ADDRESS": "", "KDPIPE_NODE_CACHE": str(node_cache)}

    def teach() -> str:
        out = subprocess.run(
            [str(BIN / "kdpipe"), "teach", str(ROOT / "pipelines" / "digits_kd.yaml"), *sets],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        return out.stdout

    def weight_gets() -> int:
        return sum(
            1 for line in s3.log_lines() if '"GET ' in line and "/teachers/" in line and "model.safetensors" in line
        )

    teach()
    assert weight_gets() == 1  # two actors, one download
    assert len([d for d in node_cache.iterdir() if d.is_dir() and not d.name.startswith(".")]) == 1
    pq.write_table(_digits_rows(900, 1797), f"{b}/once/data/b.parquet", filesystem=fs)
    assert "taught" in teach()
    assert weight_gets() == 1  # the node's copy served the second run's actors

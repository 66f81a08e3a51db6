"""Cache staging: a run's staging dir survives every other run's clean-up until it commits;
a crashed run's leftovers do not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.cache import TeacherCache

HOLD = """
import sys, time
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from kdpipe.cache import TeacherCache
cache, out, release = TeacherCache(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
with cache.staging() as staging:
    pq.write_table(pa.table({"id": ["a", "b"]}), staging / "part-0.parquet")
    out.write_text(str(staging))
    while not release.exists():
        time.sleep(0.05)
    cache.commit(staging, {"teacher_id": "t"}, "src")
"""


def _concurrent_run(tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path, Path]:
    """Another process that opens a staging dir, writes into it and commits once released."""
    out, release = tmp_path / f"{name}.dir", tmp_path / f"{name}.go"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "c"), str(out), str(release)])
    deadline = time.monotonic() + 60
    while not out.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the concurrent run did not start"
        time.sleep(0.05)
    return proc, Path(out.read_text()), release


def test_clean_up_spares_a_live_runs_staging_and_removes_a_crashed_ones(tmp_path: Path) -> None:
    live, live_dir, go = _concurrent_run(tmp_path, "live")
    crashed, crashed_dir, _ = _concurrent_run(tmp_path, "crashed")
    os.kill(crashed.pid, signal.SIGKILL)  # dies holding its staging dir: its lock goes with it
    crashed.wait()
    legacy = tmp_path / "c" / ".staging" / "0123abcd"  # a lock-less dir (older kdpipe, or a crash before locking)
    legacy.mkdir()

    cache = TeacherCache(tmp_path / "c")
    try:
        with cache.staging() as mine:
            assert live_dir.exists() and (live_dir / "part-0.parquet").exists()
            assert crashed_dir.exists() is False and legacy.exists() is False
            pq.write_table(pa.table({"id": ["c"]}), mine / "part-0.parquet")
            cache.commit(mine, {"teacher_id": "t"}, "src")
    finally:
        go.touch()  # never leave the other run waiting, whatever failed
        try:
            live.wait(timeout=60)
        finally:
            live.kill()
    assert live.returncode == 0
    assert sorted(cache.id_array().to_pylist()) == ["a", "b", "c"]
    assert list((tmp_path / "c" / ".staging").iterdir()) == []


def test_a_failed_run_leaves_no_staging_and_no_part(tmp_path: Path) -> None:
    cache = TeacherCache(tmp_path / "c")
    try:
        with cache.staging() as staging:
            pq.write_table(pa.table({"id": ["a"]}), staging / "part-0.parquet")
            raise RuntimeError("teacher crashed")
    except RuntimeError:
        pass
    assert not cache.is_complete() and list((tmp_path / "c" / ".staging").iterdir()) == []


def test_new_weights_params_topk_or_outputs_never_reuse_a_cache(tmp_path: Path) -> None:
    """The cache fingerprint covers everything that decides a teacher's outputs: a weights file
    whose bytes change (same name, same size), its params, top-k and outputs."""
    from kdpipe.config import TeacherConfig
    from kdpipe.lm.corpus import default_tokenizer
    from kdpipe.teach import teacher_fingerprint
    from teachers import TEACHERS
    from tests.test_lm_models import save_tiny_llama

    save_tiny_llama(tmp_path / "t", default_tokenizer(), layers=1)
    base = TeacherConfig(
        id="lm",
        kind="hf_causal_lm",
        path=str(tmp_path / "t"),
        topk=8,
        outputs=["tokens", "topk"],
        params={"max_length": 16},
    )
    cls = TEACHERS.get("hf_causal_lm")
    fp = teacher_fingerprint(base, cls.weights_digest(base))
    assert fp == teacher_fingerprint(base, cls.weights_digest(base))  # stable
    for change in ({"topk": 16}, {"outputs": ["tokens", "topk", "hidden"]}, {"params": {"max_length": 24}}):
        other = base.model_copy(update=change)
        assert teacher_fingerprint(other, cls.weights_digest(other)) != fp, change
    weights = next((tmp_path / "t").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert teacher_fingerprint(base, cls.weights_digest(base)) != fp

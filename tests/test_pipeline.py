"""The whole tiny pipeline on a real local Ray, real Parquet and a real MLflow sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from kdpipe.cache import MANIFEST, CacheCorruptError, TeacherCache
from kdpipe.config import load_spec
from kdpipe.pipeline import distil, locate_caches, prepare, teach
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(900)


def test_full_pipeline_teach_cache_distil_track(ray_local, tmp_path: Path, monkeypatch) -> None:
    """The default pipeline end to end; its distil stage runs with every driver-side read of rows
    (`ray.data.from_arrow` of a table, reading a whole cache, the source table or index) turned
    into an error, so it trains, evaluates and registers from Ray Data alone."""
    from kdpipe.data import SourceData

    # the default pipeline as `make demo` runs it, only its outputs moved under tmp_path
    paths = {k: v for k, v in tiny_overrides(tmp_path).items() if k in ("storage", "tracking.tracking_uri")}
    cfg = load_spec("pipelines/digits_kd.yaml", paths)
    source, uri = prepare(cfg)
    assert source.index_ is None and Path(source.index_path).exists()  # the index is a file, not driver memory
    taught = teach(cfg, source)

    def refuse(*a, **k):
        raise AssertionError("the driver read rows")

    with monkeypatch.context() as guard:
        guard.setattr(ray_local.data, "from_arrow", refuse)
        guard.setattr(TeacherCache, "read", refuse)
        for name in ("table", "index"):
            guard.setattr(SourceData, name, property(refuse))
        res = distil(cfg, source, taught, uri)
    logged = MlflowClient(uri).get_run(res.run_id).data.metrics
    assert logged["rows_train"] + logged["rows_val"] + logged["rows_test"] == source.num_rows

    # cache: manifest written, one part, every source row once, dense + top-k columns
    t = res.teach["digits_mlp"]
    assert not t.reused and t.rows_taught > 1700
    m = json.loads((t.cache.dir / MANIFEST).read_text())
    assert m["teacher_id"] == "digits_mlp" and m["fingerprint"] == t.fingerprint and len(m["weights_digest"]) == 16
    assert m["rows"] == t.rows_taught and len(m["parts"]) == 1
    assert {"id", "logits", "topk_idx", "topk_val", "tail_lse"} <= set(m["schema"])
    table = t.cache.read()
    assert table.num_rows == m["rows"] and len(set(table["id"].to_pylist())) == m["rows"]
    assert str(table.schema.field("topk_val").type.value_type) == "halffloat"

    # MLflow: one finished run with params, per-epoch metrics, artifacts, a registered version with lineage
    client = MlflowClient(res.tracking_uri)
    run_ = client.get_run(res.run_id)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["losses.0.name"] == "kd" and "test_acc" in run_.data.metrics
    history = client.get_metric_history(res.run_id, "val_acc")
    assert [h.step for h in history] == list(range(cfg.train.epochs))
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"spec.yaml", "caches", "figures"} <= arts
    # the run page: figures, the data it read as dataset inputs, a description, system metrics
    figs = {a.path for a in client.list_artifacts(res.run_id, "figures")}
    assert figs == {f"figures/{n}.png" for n in ("training_curves", "gate_metric", "confusion", "reliability")}
    inputs = {(d.dataset.name, d.dataset.digest) for d in run_.inputs.dataset_inputs}
    assert inputs == {("source:sklearn_digits", source.fingerprint), ("cache:digits_mlp", t.fingerprint)}
    by_name = {d.dataset.name: d.dataset for d in run_.inputs.dataset_inputs}
    src_schema = json.loads(by_name["source:sklearn_digits"].schema)["mlflow_colspec"]
    assert [c["name"] for c in src_schema] == ["id", "x", "label"]  # the columns, not an empty schema
    profile = json.loads(by_name["source:sklearn_digits"].profile)
    assert profile["num_rows"] == source.num_rows and profile["rows_test"] == logged["rows_test"]
    cache_cols = {c["name"] for c in json.loads(by_name["cache:digits_mlp"].schema)["mlflow_colspec"]}
    assert {"id", "logits", "topk_idx", "topk_val", "tail_lse"} <= cache_cols
    note = run_.data.tags["mlflow.note.content"]
    assert "`digits_mlp`" in note and "student `mlp`" in note and f"/{res.model_version}`" in note
    assert ("promoted to `@champion`" in note) == res.promoted and res.table in note
    assert any(k.startswith("system/cpu") for k in run_.data.metrics)
    assert 0 <= run_.data.metrics["test_ece"] <= 1 and 0 <= run_.data.metrics["teacher_digits_mlp_test_ece"] <= 1
    mv = client.get_model_version(cfg.tracking.model_name, res.model_version)
    assert mv.tags["kdpipe.cache.digits_mlp"] == t.fingerprint and mv.run_id == res.run_id
    assert mv.tags["kdpipe.source_fingerprint"] and mv.tags["kdpipe.spec_hash"] == cfg.spec_hash()
    # alias follows the gate, whichever way it went
    gates = json.loads(mv.tags["kdpipe.gates"])
    assert "over_baseline" in gates
    aliases = client.get_registered_model(cfg.tracking.model_name).aliases
    assert (
        (str(aliases.get("champion")) == res.model_version) == res.promoted == all(g["passed"] for g in gates.values())
    )
    # the product's point: the distilled student beats its label-only twin (README: 0.853 vs 0.745;
    # which rows each worker streams is Ray Data's run-time choice); half that margin is the bar
    assert res.metrics["test_acc"] >= res.metrics["baseline_test_acc"] + 0.05, res.metrics
    assert res.promoted
    assert "baseline_test_acc" in res.metrics and "teacher_digits_mlp_test_acc" in res.metrics

    # the registered model serves: models:/NAME@ALIAS or /VERSION predicts logits
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(res.tracking_uri)
    served = mlflow.pytorch.load_model(f"models:/{cfg.tracking.model_name}/{res.model_version}")
    assert tuple(served(torch.zeros(3, 64)).shape) == (3, 10)

    # a second run reuses the cache: nothing taught, same fingerprint
    source, _ = prepare(cfg)
    again = teach(cfg, source)["digits_mlp"]
    assert again.reused and again.rows_taught == 0 and again.fingerprint == t.fingerprint


def test_incomplete_cache_is_never_reused(ray_local, tmp_path: Path) -> None:
    cfg = load_spec("pipelines/digits_kd.yaml", tiny_overrides(tmp_path, **{"source.limit": 300}))
    source, uri = prepare(cfg)
    first = teach(cfg, source)["digits_mlp"]
    # a manifest lost or deleted: the parts are there, but nothing may read them as a cache, and
    # nothing teaches their rows again silently beside them (`kdpipe cache repair` rebuilds it)
    (first.cache.dir / MANIFEST).unlink()
    with pytest.raises(CacheCorruptError, match="no MANIFEST.json.*kdpipe cache repair"):
        locate_caches(cfg, source)
    assert not TeacherCache(first.cache.dir).is_complete()
    with pytest.raises(CacheCorruptError, match="no MANIFEST.json"):
        teach(cfg, source)
    assert len(list((first.cache.dir / "parts").iterdir())) == 1


def _flip_a_value_in_place(part: Path) -> None:
    """Flip one byte inside a data page of the largest column so the file keeps its size and
    still parses, with different values: only the manifest's checksum can tell."""
    meta = pq.ParquetFile(part).metadata
    original = pq.read_table(part)
    chunk = max((meta.row_group(0).column(i) for i in range(meta.num_columns)), key=lambda c: c.total_compressed_size)
    data = bytearray(part.read_bytes())
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    for pos in range(end - 8, chunk.data_page_offset, -7):
        trial = bytearray(data)
        trial[pos] ^= 0x10
        part.write_bytes(bytes(trial))
        try:
            if not pq.read_table(part).equals(original):
                assert len(trial) == len(data)
                return
        except (pa.ArrowException, OSError):
            pass
    raise AssertionError("no byte flip kept the file readable")


def test_corrupt_cache_part_is_detected(ray_local, tmp_path: Path) -> None:
    """A part whose bytes changed (same size, still valid Parquet) or that is missing fails the
    distil stage with the file named; nothing trains on it."""
    cfg = load_spec("pipelines/digits_kd.yaml", tiny_overrides(tmp_path, **{"source.limit": 200}))
    source, uri = prepare(cfg)
    r = teach(cfg, source)["digits_mlp"]
    part = r.cache.files()[0]
    good = part.read_bytes()
    _flip_a_value_in_place(part)
    with pytest.raises(CacheCorruptError, match=f"{part}.*does not match its checksum"):
        distil(cfg, source, locate_caches(cfg, source), uri)
    part.write_bytes(good)
    part.unlink()
    with pytest.raises(CacheCorruptError, match=f"{part} is missing .*kdpipe cache repair"):
        distil(cfg, source, locate_caches(cfg, source), uri)


def test_shuffle_buffer_reorders_batches_every_epoch_reproducibly(ray_local) -> None:
    """train.shuffle_buffer: every epoch sees all rows in a new order; the same (seed, epoch, rank)
    gives the same order (a resumed run replays it); 0 keeps the fixed order."""
    from kdpipe.train import epoch_batches

    it = ray_local.data.range(200, override_num_blocks=4).iterator()

    def order(buffer: int, epoch: int) -> list[int]:
        return [int(v) for b in epoch_batches(it, 32, buffer, seed=0, epoch=epoch, rank=0) for v in b["id"]]

    e0, e0_again, e1 = order(500, 0), order(500, 0), order(500, 1)
    assert sorted(e0) == sorted(e1) == list(range(200))
    assert e0 == e0_again and e0 != e1
    assert order(0, 0) == order(0, 1) == list(range(200))


def test_a_small_dataset_reaches_every_worker_whole_and_each_rank_keeps_an_equal_share(ray_local) -> None:
    """`fits_whole`: a materialised dataset within train.keep_in_memory_mb is not split by Ray Data
    (no split coordinator to start); `EpochReplay.rank_share` then gives rank r the rows r·m to
    (r+1)·m − 1 of the dataset's order, m = rows // world (the remainder dropped, so every rank
    steps equally often), read once and replayed every epoch."""
    from kdpipe.train import EpochReplay, fits_whole
    from kdpipe.views import labeled_only

    ds = ray_local.data.range(203, override_num_blocks=5).materialize()
    assert fits_whole(ds, 2**20)
    assert not fits_whole(ds, 100)  # 1.6 KB of ids: over the limit, split and streamed as before
    assert not fits_whole(ds, 0)  # keep_in_memory_mb: 0 streams everything
    assert not fits_whole(
        ds.map_batches(lambda b: b), 2**20
    )  # lazy (the LM views decode per batch): its size is unknown

    class Counting:  # the whole dataset's iterator, counting passes over it
        def __init__(self, it):
            self.it, self.passes = it, 0

        def iter_torch_batches(self, **kw):
            self.passes += 1
            return self.it.iter_torch_batches(**kw)

    order = [int(i) for b in ds.iter_batches(batch_size=None) for i in b["id"]]
    shares = []
    for rank in range(3):
        whole = Counting(ds.iterator())
        replay = EpochReplay.rank_share(whole, ds.count(), rank, 3)
        epochs = [
            [i for b in replay.batches(16, 0, seed=0, epoch=e, rank=rank) for i in b["id"].tolist()] for e in range(3)
        ]
        assert whole.passes == 1 and epochs[0] == epochs[1] == epochs[2]
        shuffled = [i for b in replay.batches(16, 50, seed=0, epoch=1, rank=rank) for i in b["id"].tolist()]
        assert sorted(shuffled) == sorted(epochs[0]) and shuffled != epochs[0]
        shares.append(epochs[0])
    assert [len(s) for s in shares] == [67, 67, 67] and sum(shares, []) == order[:201]
    # shares that cross batch boundaries: batches of 4,096 rows, a share of 3,333 rows per rank
    big = ray_local.data.range(10_000, override_num_blocks=3).materialize()
    cut = [EpochReplay.rank_share(big.iterator(), 10_000, r, 3).columns["id"].tolist() for r in range(3)]
    assert sum(cut, []) == [int(i) for b in big.iter_batches(batch_size=None) for i in b["id"]][:9_999]
    empty = EpochReplay.rank_share(ray_local.data.range(1).materialize().iterator(), 1, 1, 2)
    assert list(empty.batches(16)) == []  # fewer rows than ranks: no rank steps
    with pytest.raises(RuntimeError, match="read 53 rows of its share of 150"):  # counted wrong: refused, not a hang
        EpochReplay.rank_share(ds.iterator(), 300, 1, 2)
    labeled = ray_local.data.from_items([{"label": l} for l in (3, -1, 0, -1)]).materialize()
    kept = labeled_only(labeled, materialise=True)
    assert fits_whole(kept, 2**20) and sorted(r["label"] for r in kept.take_all()) == [0, 3]
    assert not fits_whole(labeled_only(labeled), 2**20)  # lazy unless asked: a big view's filter stays streamed


def test_small_shards_are_replayed_from_worker_memory_after_the_first_epoch(ray_local) -> None:
    """train.keep_in_memory_mb: a shard that fits is streamed from Ray Data once, then every epoch
    is sliced from memory — the same rows in the same batches (no shuffle), or a new seeded order
    of all rows (shuffle); a shard over the limit is streamed every epoch."""
    import torch

    from kdpipe.train import EpochReplay

    class Counting:  # the shard, counting how many epochs Ray Data was asked for
        def __init__(self, it):
            self.it, self.epochs = it, 0

        def iter_torch_batches(self, **kw):
            self.epochs += 1
            return self.it.iter_torch_batches(**kw)

    def epochs(limit_mb: float, buffer: int, n: int = 3) -> tuple[list[list[list[int]]], int]:
        shard = Counting(ray_local.data.range(200, override_num_blocks=4).iterator())
        replay = EpochReplay(shard, limit_mb * 2**20)
        out = [[b["id"].tolist() for b in replay.batches(32, buffer, seed=0, epoch=e, rank=0)] for e in range(n)]
        return out, shard.epochs

    kept, asked = epochs(1, 0)
    assert asked == 1 and kept[0] == kept[1] == kept[2] and [len(b) for b in kept[0]] == [32] * 6 + [8]
    assert sorted(sum(kept[0], [])) == list(range(200))  # (the order of Ray Data's blocks is its own)
    streamed, asked = epochs(0.0001, 0)  # 1.6 KB of ids: more than 100 bytes
    assert asked == 3 and all(sorted(sum(e, [])) == list(range(200)) for e in streamed)
    shuffled, asked = epochs(1, 500)
    assert asked == 1 and all(sorted(sum(e, [])) == list(range(200)) for e in shuffled)
    assert sum(shuffled[1], []) != sum(shuffled[2], [])  # a new order every replayed epoch
    # the replayed order is a seeded permutation of what epoch 0 kept: the same (seed, epoch, rank) gives it again
    replay = EpochReplay(None, 0)
    replay.columns = {"id": torch.tensor(sum(shuffled[0], []))}
    assert [b["id"].tolist() for b in replay.batches(32, 500, seed=0, epoch=2, rank=0)] == shuffled[2]

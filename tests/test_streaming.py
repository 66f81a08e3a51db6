"""The distil stage streams: the cache is the training dataset and the driver holds no rows
(the end-to-end check that the driver reads no rows is in test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdpipe.config import KdpipeError, load_spec
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.timeout(900)


def _digits_parquet(path: Path, n: int) -> Path:
    from sklearn.datasets import load_digits

    from kdpipe.arrays import to_fixed_list

    d = load_digits()
    path.parent.mkdir(parents=True, exist_ok=True)
    idx = np.arange(n) % len(d.data)
    x = (d.data[idx] / 16.0).astype(np.float32) + (np.arange(n) // len(d.data))[:, None].astype(np.float32) * 1e-4
    pq.write_table(
        pa.table({"x": to_fixed_list(x), "label": pa.array(d.target[idx].astype(np.int64))}), path, row_group_size=256
    )
    return path


def _spec(tmp_path: Path, n: int = 900):
    data = _digits_parquet(tmp_path / "rows.parquet", n)
    return load_spec(
        "pipelines/digits_kd.yaml",
        tiny_overrides(
            tmp_path,
            **{
                "source": {
                    "kind": "parquet",
                    "path": str(data),
                    "features": "x",
                    "label": "label",
                    "split": {"val": 0.15, "test": 0.25, "labeled_fraction": 0.1},
                },
                "train.epochs": 2,
                "train.checkpoint_every": 2,
                "evaluate.baseline_epochs": 1,
            },
        ),
    )


def test_views_join_every_part_keep_fp16_and_hide_labels(ray_local, tmp_path: Path, monkeypatch) -> None:
    """An incremental teach finds the rows its cache lacks inside Ray Data (the driver reads
    neither the source's ids nor the cache's). The views join the source with *every* cache
    part, keep fp16 columns fp16 until a worker widens a batch, hide labels of unlabeled train
    rows, and refuse a cache that lacks rows."""
    from kdpipe.cache import TeacherCache
    from kdpipe.data import SourceData
    from kdpipe.evaluate import float_batch
    from kdpipe.pipeline import prepare, teach
    from kdpipe.todo import IdTally, rows_missing
    from kdpipe.views import build_views

    cfg = _spec(tmp_path, 600)
    first = cfg.model_copy(update={"source": cfg.source.model_copy(update={"limit": 400})})
    cache = cache_of(teach(first, prepare(first)[0]))  # 400 rows
    source, _ = prepare(cfg)  # 600 rows

    # the rows to teach: the 200 new ones, by broadcast filter and by Ray Data's anti-join alike
    old_ids = set(cache.id_array().to_pylist())
    new_ids = [i for i in source.index["id"].to_pylist() if i not in old_ids]
    for broadcast in (None, 0):
        todo = rows_missing(source, cache, 4, broadcast_bytes=broadcast)
        assert todo.tally == IdTally.of(pa.array(new_ids)) and todo.rows == 200
        assert sorted(todo.index.to_pandas()["id"]) == sorted(new_ids)

    def refuse(*a, **k):
        raise AssertionError("the driver read ids")

    with monkeypatch.context() as guard:
        guard.setattr(TeacherCache, "read", refuse)
        guard.setattr(TeacherCache, "id_array", refuse)
        for name in ("table", "index"):
            guard.setattr(SourceData, name, property(refuse))
        taught = teach(cfg, source)  # a second part with the 200 new rows
    cache = cache_of(taught)
    assert len(cache.manifest()["parts"]) == 2 and taught["digits_mlp"].rows_taught == 200
    assert sorted(cache.id_array().to_pylist()) == sorted(source.index["id"].to_pylist())  # each row once

    views = build_views(source, {"digits_mlp": cache})
    assert sum(views.rows.values()) == 600
    plan = views.train.stats()  # blocks are prepared inside the lookup actor: a step after it stalled on 2 CPUs
    assert "MapBatches(LookupJoin)" in plan and "prepare_block" not in plan
    batch = views.train.take_batch(1000, batch_format="numpy")
    assert batch["digits_mlp.topk_val"].dtype == np.float16  # stays fp16 in the object store
    assert float_batch(batch)["digits_mlp.topk_val"].dtype.is_floating_point
    assert str(float_batch(batch)["digits_mlp.topk_val"].dtype) == "torch.float32"  # widened per batch
    index = source.index
    train = index.filter(pa.compute.equal(index["split"], "train"))
    visible = int(np.sum(batch["label"] >= 0))
    assert visible == int(np.sum(train["labeled"].to_numpy(zero_copy_only=False)))
    assert 0 < visible < len(batch["label"])
    test = views.test.take_batch(1000, batch_format="numpy")
    assert (test["label"] >= 0).all() and "split" not in test and "id" not in test

    # sides too big to broadcast go through Ray Data's hash join instead: the same rows, each with its own
    # teacher outputs, either way
    shuffled = build_views(source, {"digits_mlp": cache}, broadcast_bytes=0)
    assert shuffled.rows == views.rows
    other = shuffled.test.take_batch(1000, batch_format="numpy")
    key = lambda b: sorted(map(tuple, np.round(np.hstack([b["x"], b["digits_mlp.logits"]]), 4).tolist()))  # noqa: E731
    assert key(other) == key(test)

    # a cache lacking rows of the source is refused with the fix, not silently trained on
    bigger = _spec(tmp_path / "more", 700)
    src_more, _ = prepare(bigger)
    with pytest.raises(KdpipeError, match="lack 100 of 700.*kdpipe teach"):
        build_views(src_more, {"digits_mlp": _shifted(cache, tmp_path, src_more)})


def cache_of(taught: dict) -> object:
    return taught["digits_mlp"].cache


def _shifted(cache, tmp_path: Path, src) -> object:
    """A copy of `cache` keyed to `src`'s ids for its first 600 rows (so 100 are missing)."""

    from kdpipe.cache import TeacherCache

    t = cache.read()
    ids = src.index["id"].slice(0, 600)
    t = t.set_column(0, "id", ids)
    c = TeacherCache(tmp_path / "shifted")
    with c.staging() as staging:
        pq.write_table(t, staging / "part-0.parquet")
        c.commit(staging, {"teacher_id": "digits_mlp"}, "src")
    return c


def test_evaluation_ships_the_models_through_the_object_store(ray_local) -> None:
    """The models' weights go to the scoring actor as one object-store ref, not inside the map
    function that Ray Data serialises for each operator (the LM student's 135 MB did, with a
    warning, on the GPU run): no "too large" warning, and the metrics are the model's own."""
    import logging

    import ray
    import torch

    from kdpipe.evaluate import evaluate_models

    class HeavyFactory:  # local, so Ray pickles it by value (workers cannot import this test module)
        """A model factory that carries 128 MB of weights, like a transformer student's state."""

        def __init__(self) -> None:
            self.blob = np.zeros(32 * 1024 * 1024, np.float32)

        def __call__(self) -> torch.nn.Module:
            class Sign(torch.nn.Module):  # predicts class 1 where x > 0
                def forward(self, batch):
                    x = batch["x"].float()
                    return {"logits": torch.cat([-x, x], 1)}

            return Sign()

    x = np.array([[-1.0], [2.0], [3.0], [-4.0]], np.float32)
    ds = ray.data.from_items([{"x": r, "label": lab} for r, lab in zip(x, [0, 1, 0, 0])])
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())  # type: ignore[method-assign]
    ray_data_log = logging.getLogger("ray.data")
    ray_data_log.addHandler(handler)
    try:
        scored = evaluate_models("classification", {"test_": HeavyFactory()}, ds, num_classes=2, in_driver_bytes=0)
    finally:
        ray_data_log.removeHandler(handler)
    assert scored.metrics["test_acc"] == 0.75
    assert not [m for m in seen if "too large" in m], seen

"""The teach stage's Ray Data plan (`kdpipe.teach.teach_dataset`), built lazily: checked on any
machine, GPU or not, without running a teacher."""

from __future__ import annotations

import logging
from pathlib import Path

from kdpipe.config import load_spec


def test_gpu_teacher_plan_builds_with_cpu_read_tasks(ray_local, tmp_path: Path) -> None:
    """`teach.num_gpus > 0` failed before reading a row (found on an H200): the read step asked for
    the teacher's GPU, and Ray Data refuses a GPU map step without a batch size. The plan is lazy,
    so it builds (and is checked) on a machine without a GPU."""
    from kdpipe.pipeline import prepare
    from kdpipe.teach import teach_dataset

    cfg = load_spec(
        "pipelines/digits_kd.yaml",
        {"teach.num_gpus": 1, "storage": str(tmp_path), "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"},
    )
    source, _ = prepare(cfg)
    ds = teach_dataset(cfg.teach, cfg.teachers[0], source)
    assert "TeacherActor" in str(ds)


def test_teacher_actors_taking_every_cpu_are_warned_about(ray_local, tmp_path: Path, caplog) -> None:
    """Actors holding every CPU starve Ray Data's read tasks and the stage never starts: a warning
    names the two keys to change."""
    import ray

    from kdpipe.pipeline import prepare
    from kdpipe.teach import teach_dataset

    cpus = ray.cluster_resources()["CPU"]
    cfg = load_spec(
        "pipelines/digits_kd.yaml",
        {
            "teach.num_cpus": cpus,
            "storage": str(tmp_path),
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        },
    )
    source, _ = prepare(cfg)
    with caplog.at_level(logging.WARNING, logger="kdpipe.teach"):
        teach_dataset(cfg.teach, cfg.teachers[0], source)
    assert any("teach.num_cpus or teach.concurrency" in m for m in caplog.messages), caplog.messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdpipe.teach"):
        teach_dataset(
            load_spec("pipelines/digits_kd.yaml", {"teach.num_cpus": cpus / 2}).teach, cfg.teachers[0], source
        )
    assert not caplog.messages

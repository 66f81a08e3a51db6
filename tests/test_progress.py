"""Per-epoch progress lines come from the metrics the run recorded in MLflow."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from kdpipe.progress import EpochProgress


def test_progress_logs_the_newest_recorded_epoch_with_pace_and_eta(tmp_path: Path, caplog) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("p")).info.run_id
    caplog.set_level(logging.INFO, logger="kdpipe.progress")
    t0 = int(time.time() * 1000)

    def epoch(step: int) -> None:  # what rank 0's MetricsLogger writes, 2 s apart
        client.log_batch(
            run_id,
            metrics=[
                Metric("baseline_train_loss", 1.0 / (step + 1), t0 + 2000 * step, step),
                Metric("baseline_val_acc", 0.5 + 0.1 * step, t0 + 2000 * step, step),
                Metric("train_loss", 9.0, t0, step),
            ],
        )  # another model's metric: ignored

    started = time.monotonic()
    with EpochProgress(uri, run_id, [("baseline", "baseline_", 5)], every_s=3600) as p:
        p.poll()  # nothing recorded yet: no line
        epoch(0)
        p.poll()
        epoch(1)
        p.poll()
        p.poll()  # nothing new: no line
        epoch(2)
        epoch(3)  # two epochs between polls: one line, the newest
    lines = [r.getMessage() for r in caplog.records if r.name == "kdpipe.progress"]
    assert [line.split(":")[0] for line in lines] == ["baseline epoch 1/5", "baseline epoch 2/5", "baseline epoch 4/5"]
    # the first epoch has no pace yet: the line says how long the run has been going (bounded by
    # what this test measured around it, so a slow machine does not fail it)
    into = re.search(r"\(first epoch, (\d+) s into the run\)$", lines[0])
    assert into and int(into.group(1)) <= round(time.monotonic() - started), lines[0]
    assert "train_loss 0.5000 val_acc 0.6000 (2.00 s/epoch, ETA 6 s)" in lines[1]
    assert "train_loss 0.2500 val_acc 0.8000 (2.00 s/epoch, ETA 2 s)" in lines[2]


def test_teach_progress_counts_the_rows_of_files_that_landed(tmp_path: Path, caplog) -> None:
    """Teach progress reads rows from the footers of the output files in the staging dir; a file
    still being written (no footer yet) is counted once it is whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdpipe.progress import TeachProgress

    caplog.set_level(logging.INFO, logger="kdpipe.progress")
    with TeachProgress("teacher t", tmp_path, 300, every_s=3600) as p:
        p.poll()  # nothing yet: no line
        pq.write_table(pa.table({"id": [str(i) for i in range(100)]}), tmp_path / "a.parquet")
        (tmp_path / "b.parquet").write_bytes(b"PAR1 half a file")
        p.poll()
        p.poll()  # nothing new: no line
        pq.write_table(pa.table({"id": [str(i) for i in range(200)]}), tmp_path / "b.parquet")
    lines = [r.getMessage() for r in caplog.records if r.name == "kdpipe.progress"]
    assert [line.split(" (")[0] for line in lines] == ["teacher t: 100/300 rows", "teacher t: 300/300 rows"]
    assert "ETA" in lines[0] and "ETA" not in lines[1]


def test_a_quiet_stage_says_what_is_still_running(tmp_path: Path, caplog) -> None:
    """Nothing recorded for `quiet_s`: the poller says which step is running instead of staying silent;
    once an epoch is recorded, the next quiet line names the epoch that runs."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("q")).info.run_id
    caplog.set_level(logging.INFO, logger="kdpipe.progress")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "kdpipe.progress"]

    with EpochProgress(uri, run_id, [("student", "", 3)], every_s=0.05, quiet_s=0.2):
        deadline = time.monotonic() + 30
        while not any("workers starting" in line for line in lines()) and time.monotonic() < deadline:
            time.sleep(0.05)
        client.log_metric(run_id, "train_loss", 1.0, step=0)
        while not any("epoch 2/3 running" in line for line in lines()) and time.monotonic() < deadline:
            time.sleep(0.05)
    said = lines()
    assert said[0].startswith("student: Ray Train workers starting and reading the cache ("), said
    assert any(line.startswith("student epoch 1/3: train_loss 1.0000") for line in said), said
    assert any(line.startswith("student: epoch 2/3 running (") for line in said), said


def test_local_ray_starts_with_ray_train_settings_its_processes_inherit(ray_local) -> None:
    """The embedded cluster's processes (Train's controller among them) see kdpipe's local Ray
    Train settings: a 0.2 s poll, so that a checkpointed epoch is not held ~2 s by Ray's default
    poll; no preemption watcher. Set after Ray started, they would reach no process."""
    import os

    from kdpipe.runtime import LOCAL_TRAIN_ENV, local_train_settings

    @ray_local.remote(num_cpus=0)
    def seen() -> dict[str, str | None]:
        return {k: os.environ.get(k) for k in LOCAL_TRAIN_ENV}

    expected = {k: os.environ.get(k) for k in LOCAL_TRAIN_ENV}
    assert None not in expected.values(), expected
    assert ray_local.get(seen.remote()) == expected
    mine = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}
    local_train_settings(mine)  # a value the user exported wins
    assert mine == {**LOCAL_TRAIN_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}

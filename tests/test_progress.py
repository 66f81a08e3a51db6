"""Per-epoch progress lines come from the metrics the run recorded in MLflow."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from kdpipe.progress import EpochProgress


def test_progress_logs_each_recorded_epoch_once_with_pace_and_eta(tmp_path: Path, caplog) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("p")).info.run_id
    caplog.set_level(logging.INFO, logger="kdpipe.progress")
    t0 = int(time.time() * 1000)
    with EpochProgress(uri, run_id, "baseline_", epochs=4, name="baseline", every_s=0.05) as p:
        for step in range(3):  # what rank 0's MetricsLogger writes, 2 s apart
            client.log_batch(run_id, metrics=[Metric("baseline_train_loss", 1.0 / (step + 1), t0 + 2000 * step, step),
                                              Metric("baseline_val_acc", 0.5 + 0.1 * step, t0 + 2000 * step, step)])
            time.sleep(0.2)
        p.poll()
    lines = [r.getMessage() for r in caplog.records if r.name == "kdpipe.progress"]
    assert [line.split(":")[0] for line in lines] == ["baseline epoch 1/4", "baseline epoch 2/4", "baseline epoch 3/4"]
    assert "train_loss 0.5000 val_acc 0.6000 (2.00 s/epoch, ETA 4 s)" in lines[1]
    assert "val_acc 0.7000" in lines[2] and "ETA 2 s" in lines[2]

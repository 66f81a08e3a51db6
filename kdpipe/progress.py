"""What a person watching the console sees while a student trains: one line per epoch.

Training runs in Ray Train workers, whose output the embedded Ray keeps off the console. Rank 0
already writes every epoch's metrics to the MLflow run, so the driver reads them back from there
(a poll of the run's metric history every few seconds) and logs them with the time per epoch and
an ETA: the progress shown is what the run recorded, nothing else.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("kdpipe.progress")


class EpochProgress:
    """Context manager around a fit: logs `<name> epoch i/N: loss … val_… (s/epoch, ETA)` for the
    newest recorded epoch at each poll (every `every_s` seconds) and for the last one."""

    def __init__(self, tracking_uri: str, run_id: str, prefix: str, epochs: int, name: str,
                 every_s: float = 3.0) -> None:
        self.uri, self.run_id, self.prefix, self.epochs, self.name = tracking_uri, run_id, prefix, epochs, name
        self.every_s = every_s
        self.shown = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def __enter__(self) -> "EpochProgress":
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"progress-{self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()  # the last epochs, logged just before the fit returned

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        """Log the newest epoch recorded since the last poll (never raises: progress is cosmetic)."""
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.uri)
            history = client.get_metric_history(self.run_id, f"{self.prefix}train_loss")
            loss = {m.step: m.value for m in history}
            stamp = {m.step: m.timestamp / 1000 for m in history}
            if not loss or max(loss) <= self.shown:
                return
            metrics = client.get_run(self.run_id).data.metrics
            val_keys = sorted(k for k in metrics if k.startswith(f"{self.prefix}val_"))
            val = {k: {m.step: m.value for m in client.get_metric_history(self.run_id, k)} for k in val_keys}
        except Exception as e:  # noqa: BLE001
            log.debug("progress poll failed: %s", e)
            return
        step = max(loss)  # the newest epoch only: a line every few seconds, every epoch is in the run
        if step > self.shown:
            done = step + 1
            vals = " ".join(f"{k.removeprefix(self.prefix)} {v[step]:.4f}" for k, v in val.items() if step in v)
            if step > min(stamp):  # epoch time from the run's own timestamps (the first epoch has none)
                per = (stamp[step] - stamp[min(stamp)]) / (step - min(stamp))
                pace = f"{per:.2f} s/epoch, ETA {per * (self.epochs - done):.0f} s"
            else:
                pace = f"first epoch after {time.monotonic() - self._start:.0f} s of start-up"
            log.info("%s epoch %d/%d: train_loss %.4f %s (%s)", self.name, done, self.epochs, loss[step], vals, pace)
            self.shown = step

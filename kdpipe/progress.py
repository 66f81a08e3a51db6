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
    """Context manager around a fit: for each track `(name, metric prefix, epochs)` (the student and
    its twin train in one run, one after the other), logs `<name> epoch i/N: loss … val_…
    (s/epoch, ETA)` for the newest recorded epoch at each poll (every `every_s` seconds) and for
    the last one."""

    def __init__(self, tracking_uri: str, run_id: str, tracks: list[tuple[str, str, int]],
                 every_s: float = 3.0) -> None:
        self.uri, self.run_id, self.tracks = tracking_uri, run_id, tracks
        self.every_s = every_s
        self.shown = {prefix: -1 for _, prefix, _ in tracks}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def __enter__(self) -> "EpochProgress":
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kdpipe-progress", daemon=True)
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
        """Log each track's newest epoch recorded since the last poll (never raises: progress is
        cosmetic)."""
        for name, prefix, epochs in self.tracks:
            try:
                self._poll_track(name, prefix, epochs)
            except Exception as e:  # noqa: BLE001
                log.debug("progress poll failed: %s", e)

    def _poll_track(self, name: str, prefix: str, epochs: int) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        history = client.get_metric_history(self.run_id, f"{prefix}train_loss")
        loss = {m.step: m.value for m in history}
        stamp = {m.step: m.timestamp / 1000 for m in history}
        if not loss or max(loss) <= self.shown[prefix]:
            return
        metrics = client.get_run(self.run_id).data.metrics
        val_keys = sorted(k for k in metrics if k.startswith(f"{prefix}val_"))
        val = {k: {m.step: m.value for m in client.get_metric_history(self.run_id, k)} for k in val_keys}
        step = max(loss)  # the newest epoch only: a line every few seconds, every epoch is in the run
        done = step + 1
        vals = " ".join(f"{k.removeprefix(prefix)} {v[step]:.4f}" for k, v in val.items() if step in v)
        if step > min(stamp):  # epoch time from the run's own timestamps (the first epoch has none)
            per = (stamp[step] - stamp[min(stamp)]) / (step - min(stamp))
            pace = f"{per:.2f} s/epoch, ETA {per * (epochs - done):.0f} s"
        else:
            pace = f"first epoch, {time.monotonic() - self._start:.0f} s into the run"
        log.info("%s epoch %d/%d: train_loss %.4f %s (%s)", name, done, epochs, loss[step], vals, pace)
        self.shown[prefix] = step

"""What a person watching the console sees while a stage runs: plain lines every few seconds.

Teaching and training run in Ray workers, whose output the embedded Ray keeps off the console, so
the driver watches what they record and logs it with a rate and an ETA: the teach stage's Parquet
files as they land in the staging location (rows come from the files' footers), and the training
run's per-epoch metrics, which rank 0 already writes to MLflow. The progress shown is what was
written, nothing else; polling never raises (progress is cosmetic).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kdpipe import tracking
from kdpipe.cache import staged_files
from kdpipe.storage import parquet_metadata

log = logging.getLogger("kdpipe.progress")


class _Poller:
    """A context manager that calls `poll` every `every_s` seconds on a thread, and once at exit;
    when nothing was said for `quiet_s` seconds it says what is still running (`waiting`), so that
    a person never watches a silent console for long."""

    def __init__(self, every_s: float, quiet_s: float = 8.0) -> None:
        self.every_s, self.quiet_s = every_s, quiet_s
        self._start = self._said = time.monotonic()

    def say(self, msg: str, *args: Any) -> None:
        log.info(msg, *args)
        self._said = time.monotonic()

    def __enter__(self) -> Any:
        self._start = self._said = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdpipe-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # what was written just before the stage returned

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()
            if time.monotonic() - self._said >= self.quiet_s:
                self.say("%s", self.waiting(time.monotonic() - self._start))

    def poll(self) -> None:
        raise NotImplementedError

    def waiting(self, elapsed: float) -> str:
        """One line on what is still running, `elapsed` seconds into the stage."""
        raise NotImplementedError


class TeachProgress(_Poller):
    """Context manager around a teach stage's write: logs `<label>: done/total rows (rows/s, ETA)`
    whenever more output files have landed in `staging` (a path or URI)."""

    def __init__(self, label: str, staging: Any, total: int, every_s: float = 4.0, quiet_s: float = 8.0) -> None:
        super().__init__(every_s, quiet_s)
        self.label, self.staging, self.total = label, str(staging), total
        self.rows: dict[str, int] = {}  # rows per finished file (a footer is read once)
        self.shown = 0

    def poll(self) -> None:
        try:
            self._count()
        except Exception as e:  # noqa: BLE001
            log.debug("teach progress poll failed: %s", e)
            return
        done = sum(self.rows.values())
        if done <= self.shown:
            return
        self.shown = done
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = done / elapsed
        eta = f", ETA {(self.total - done) / rate:.0f} s" if done < self.total else ""
        self.say("%s: %d/%d rows (%.0f rows/s%s)", self.label, done, self.total, rate, eta)

    def waiting(self, elapsed: float) -> str:
        what = "starting the teacher pool" if not self.shown else "teaching"
        return f"{self.label}: {self.shown}/{self.total} rows written, {what} ({elapsed:.0f} s)"

    def _count(self) -> None:

        for f in staged_files(self.staging):
            if f not in self.rows:
                try:
                    self.rows[f] = parquet_metadata(f).num_rows
                except Exception:  # noqa: BLE001 - still being written: counted at a later poll
                    continue


class EpochProgress(_Poller):
    """Context manager around a fit: for each track `(name, metric prefix, epochs)` (the student and
    its twin train in one run, one after the other), logs `<name> epoch i/N: loss … val_…
    (s/epoch, ETA)` for the newest recorded epoch at each poll (every `every_s` seconds) and for
    the last one."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        tracks: list[tuple[str, str, int]],
        every_s: float = 3.0,
        quiet_s: float = 8.0,
    ) -> None:
        super().__init__(every_s, quiet_s)
        self.uri, self.run_id, self.tracks = tracking_uri, run_id, tracks
        self.shown = {prefix: -1 for _, prefix, _ in tracks}

    def poll(self) -> None:
        """Log each track's newest epoch recorded since the last poll (never raises: progress is
        cosmetic)."""
        for name, prefix, epochs in self.tracks:
            try:
                self._poll_track(name, prefix, epochs)
            except Exception as e:  # noqa: BLE001
                log.debug("progress poll failed: %s", e)

    def _poll_track(self, name: str, prefix: str, epochs: int) -> None:
        client = tracking.client(self.uri)
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
        self.say("%s epoch %d/%d: train_loss %.4f %s (%s)", name, done, epochs, loss[step], vals, pace)
        self.shown[prefix] = step

    def waiting(self, elapsed: float) -> str:
        for name, prefix, epochs in self.tracks:
            if self.shown[prefix] + 1 < epochs:
                if self.shown[prefix] < 0:
                    return f"{name}: Ray Train workers starting and reading the cache ({elapsed:.0f} s)"
                return f"{name}: epoch {self.shown[prefix] + 2}/{epochs} running ({elapsed:.0f} s)"
        return f"Ray Train finishing: the last checkpoint ({elapsed:.0f} s)"

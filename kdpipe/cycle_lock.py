"""One retrain cycle per registered model at a time, through MLflow itself.

MLflow has no lock API and no conditional alias update, but creating a registered model is atomic
in every store (the name is unique: a sqlite store and a tracking server both refuse a second
one). So a cycle holds the lock by creating the registered model `<model>.lock`, tagged with its
holder (host, pid, a token) and a lease expiry that a heartbeat thread extends while the cycle
runs. A holder that died stops extending it: its lock expires after `lease_s` (at once when the
holder was a process of this host that no longer exists), and the next cycle takes it over by
renaming the stale lock away (a rename, like a create, succeeds for one process only) before
creating its own.

Just before moving the alias a cycle checks that it still holds the lock (`still_held`), and
`kdpipe.model_registry.promote_if_unchanged` re-reads the alias, so a cycle whose lock was taken
over, or whose champion changed meanwhile, does not move it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

log = logging.getLogger("kdpipe.cycle_lock")

LEASE_S = float(os.environ.get("KDPIPE_LOCK_LEASE_S", "300"))


def lock_name(model_name: str) -> str:
    return f"{model_name}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CycleLock:
    """`with CycleLock(client, model) as lock:` — `lock.held` says whether this process holds it;
    when not, `lock.holder` names who does."""

    def __init__(self, client: Any, model_name: str, lease_s: float | None = None) -> None:
        self.client, self.model = client, model_name
        self.name = lock_name(model_name)
        self.lease_s = float(lease_s if lease_s is not None else LEASE_S)
        self.token = uuid.uuid4().hex[:12]
        self.me = f"{socket.gethostname()}:{os.getpid()}:{self.token}"
        self.held = False
        self.holder = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ---------------------------------------------------------------- take and give back

    def __enter__(self) -> CycleLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _tags(self) -> dict[str, str]:
        return {
            "kdpipe.lock.holder": self.me,
            "kdpipe.lock.expires": f"{time.time() + self.lease_s:.3f}",
            "kdpipe.lock.model": self.model,
        }

    def acquire(self) -> bool:
        from mlflow.exceptions import MlflowException

        for _ in range(3):
            try:
                self.client.create_registered_model(
                    self.name, tags=self._tags(), description=f"kdpipe: a retrain cycle of {self.model} is running"
                )
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                holder, expires = self._read()
                if holder is None:
                    continue  # released between our create and our read: try again
                if not self._stale(holder, expires):
                    self.holder = holder
                    return False
                self._take_over(holder)
                continue
            self.held, self.holder = True, self.me
            self._beat = threading.Thread(target=self._heartbeat, name="kdpipe-lock", daemon=True)
            self._beat.start()
            log.info("%s: cycle lock taken (%s)", self.model, self.me)
            return True
        self.holder = self._read()[0] or "unknown"
        return False

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        if self.held and self.still_held():
            try:
                self.client.delete_registered_model(self.name)
            except Exception as e:  # noqa: BLE001 - an unreleased lock expires; never mask the cycle's own error
                log.warning(
                    "%s: could not release the cycle lock (%s); it expires in %.0f s", self.model, e, self.lease_s
                )
        self.held = False

    # ---------------------------------------------------------------- state

    def _read(self) -> tuple[str | None, float]:
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(self.name).tags or {}
        except MlflowException:
            return None, 0.0
        return tags.get("kdpipe.lock.holder", "unknown"), float(tags.get("kdpipe.lock.expires", "0") or 0)

    def still_held(self) -> bool:
        """Whether the lock is still ours (not expired and taken over by another cycle)."""
        return self._read()[0] == self.me

    def _stale(self, holder: str, expires: float) -> bool:
        if time.time() > expires:
            return True
        host, _, rest = holder.partition(":")
        pid = rest.partition(":")[0]
        return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))

    def _take_over(self, stale_holder: str) -> None:
        """Rename the stale lock away (one process wins), then check it was the stale one we saw:
        a lock another cycle created meanwhile is put back."""
        from mlflow.exceptions import MlflowException

        aside = f"{self.name}.stale-{self.token}"
        try:
            self.client.rename_registered_model(self.name, aside)
        except MlflowException:
            return  # another cycle moved it first
        tags = self.client.get_registered_model(aside).tags or {}
        if tags.get("kdpipe.lock.holder") != stale_holder:
            try:
                self.client.rename_registered_model(aside, self.name)
            except MlflowException:
                pass
            return
        log.warning("%s: took over the cycle lock of %s, which stopped renewing it", self.model, stale_holder)
        try:
            self.client.delete_registered_model(aside)
        except MlflowException:
            pass

    def _heartbeat(self) -> None:
        every = max(1.0, self.lease_s / 3)
        while not self._stop.wait(every):
            try:
                if not self.still_held():
                    log.warning("%s: the cycle lock was taken over; this cycle will not move the alias", self.model)
                    return
                self.client.set_registered_model_tag(
                    self.name, "kdpipe.lock.expires", f"{time.time() + self.lease_s:.3f}"
                )
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the lease covers a few
                log.debug("lock heartbeat failed: %s", e)

"""Known-benign lines that native code writes straight to stderr, kept off the console.

Ray's C++ core worker writes its ERROR lines to file descriptor 2, past Python's logging and
`kdpipe.console`'s filters, and one of them fires on every healthy run with a Ray Data actor pool:
"Actor … has constructor arguments in the object store and max_restarts > 0 …" (logged once per
process). Ray Data passes every pool its map function as an object-store reference and makes its
actors restartable, which the teacher pool needs (`tests/test_faults.py` kills a teacher actor
mid-stage); Ray 2.60 has no switch for the line short of `RAY_BACKEND_LOG_LEVEL`, which would also
hide every real native error of the driver and of the local cluster's processes.

So the `kdpipe` command points fd 2 at a pipe read by a small forwarding process that passes every
byte through as it arrives, except whole lines matching `NATIVE_BENIGN`. A process, not a thread:
when kdpipe crashes, what it wrote is still in the pipe and the forwarder still prints it.
Python's own `sys.stderr` keeps the real stream (its records already pass `kdpipe.console`, and
`isatty()` must stay true in a terminal), so a native line may print a moment after a Python line
written after it. The line is still in the Ray session's
`python-core-driver-*.log`; `-v` runs without the filter.

This file runs as the forwarder too (`python -I -S stderr_filter.py`), so it imports only the
standard library.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

NATIVE_BENIGN = (
    # Ray core_worker.cc, once per process: see the module docstring
    re.compile(rb"\] core_worker\.cc:\d+: Actor .* has constructor arguments in the object store and max_restarts > 0"),
)
NATIVE_PREFIX = b"["  # how every line of Ray's native log starts: "[2026-11-27 02:07:27,855 E 20810 20810] …"


def forward(read_fd: int, write_fd: int, drop: tuple[re.Pattern[bytes], ...] = NATIVE_BENIGN) -> None:
    """Copy `read_fd` to `write_fd` until end of file, leaving out whole lines that match `drop`.
    A partial line is held back only while it could still become a dropped one (it starts like a
    native log line); anything else, a progress bar's carriage returns included, goes out at once."""
    pending = b""
    while chunk := os.read(read_fd, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not any(p.search(line) for p in drop))
        if pending and not pending.startswith(NATIVE_PREFIX):
            out, pending = out + pending, b""
        if out:
            _write_all(write_fd, out)
    if pending and not any(p.search(pending) for p in drop):
        _write_all(write_fd, pending)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class NativeStderrFilter:
    """`start()`: fd 2 goes through the forwarder; `stop()`: fd 2 is the real stream again and the
    forwarder, at end of file, has printed everything. Only on POSIX (elsewhere both do nothing)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.real: int | None = None

    def start(self) -> None:
        if os.name != "posix" or self.proc is not None or sys.stderr is None:
            return  # (no stderr at all, a daemon's: nothing to keep clean)
        sys.stderr.flush()
        try:
            self.real = os.dup(2)
        except OSError:
            return
        read, write = os.pipe()
        # its own session: Ctrl-C stops kdpipe, not the forwarder, which prints kdpipe's last words
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__],
            stdin=read,
            stdout=self.real,
            stderr=self.real,
            start_new_session=True,
        )
        os.close(read)
        os.dup2(write, 2)
        os.close(write)
        sys.stderr = open(
            os.dup(self.real),
            "w",
            buffering=1,
            encoding=sys.stderr.encoding,  # noqa: SIM115
            errors="backslashreplace",
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc is None or self.real is None:
            return
        sys.stderr.flush()
        os.dup2(self.real, 2)  # the pipe's write end closes in this process: the forwarder reads to its end
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass  # a process this command started still holds the pipe; the forwarder ends with it
        self.proc = None


if __name__ == "__main__":
    forward(0, 1)

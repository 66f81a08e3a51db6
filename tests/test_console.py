"""The console a newcomer sees: Ray Data's per-dataset lines, benign warnings, Ray's one benign
native ERROR line and transformers' weight-loading bars are kept off it (Ray's lines still in its
session logs), real warnings and native output still reach it, also from a crashing process; `-v`
keeps everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_overrides
from tests.servers import BIN

SCRIPT = """
import logging, sys
from kdpipe.console import configure
from kdpipe.stderr_filter import NativeStderrFilter
if sys.argv[1] != "1":
    NativeStderrFilter().start()  # as the `kdpipe` command does without -v
configure(verbose=sys.argv[1] == "1")
import ray
ray.init(num_cpus=1, include_dashboard=False)
ray.data.range(10).materialize()  # Ray Data logs "execution finished" at INFO

class Double:  # an actor pool: Ray's core worker logs its once-per-process "max_restarts > 0" ERROR line
    def __call__(self, batch):
        return {"id": batch["id"] * 2}

doubled = ray.data.range(10).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1))
print("DOUBLED", sorted(r["id"] for r in doubled.take_all()) == list(range(0, 20, 2)))
logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, ...")
logging.getLogger("ray.data.dataset").warning("Warning: The Ray cluster currently does not have any available CPUs. ...")
from transformers.utils import logging as hf_logging
print("HF_BARS", hf_logging.is_progress_bar_enabled())
logging.getLogger("ray.data.foo").warning("a real Ray Data warning")
logging.getLogger("ray._private.x").warning("a real Ray warning")
logging.getLogger("kdpipe.teach").info("kdpipe's own line")
print("SESSION", ray._private.worker._global_node.get_session_dir_path())
ray.shutdown()
"""


def _run(verbose: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_DATA_LOGGING_CONFIG", "RAY_ADDRESS")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if verbose else "0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def test_quiet_console_keeps_what_matters_and_ray_data_logs_the_rest_to_its_file() -> None:
    quiet = _run(False)
    assert "kdpipe's own line" in quiet and "a real Ray Data warning" in quiet and "a real Ray warning" in quiet
    assert "execution finished" not in quiet and "Progress bars disabled" not in quiet
    assert "Token authentication is enabled" not in quiet and "does not have any available CPUs" not in quiet
    assert "DOUBLED True" in quiet and RAY_RESTART_LINE not in quiet
    verbose = _run(True)
    assert "HF_BARS False" in quiet and "HF_BARS True" in verbose  # transformers' "Loading weights" bars
    assert RAY_RESTART_LINE in verbose  # -v shows Ray's native line: it is emitted, and only filtered
    # the lines kept off the console were emitted: they are in the session's logs
    session = Path([line for line in quiet.splitlines() if line.startswith("SESSION ")][-1].split(" ", 1)[1])
    logged = "".join(p.read_text(errors="replace") for p in session.rglob("ray-data*.log"))
    assert "execution finished" in logged and "Progress bars disabled" in logged
    assert RAY_RESTART_LINE in "".join(p.read_text(errors="replace") for p in session.rglob("python-core-driver-*.log"))


RAY_RESTART_LINE = "has constructor arguments in the object store and max_restarts > 0"

CRASH = r"""
import os, sys
from kdpipe.stderr_filter import NativeStderrFilter
NativeStderrFilter().start()
benign = (b"[2026-11-27 02:07:27,855 E 20810 20810] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' "
          b"and ID: '83' has constructor arguments in the object store and max_restarts > 0. If the arguments ...")
os.write(2, b"native before\n" + benign + b"\n")
for i in range(3000):  # ~200 KB: more than a pipe holds, so most of it is still unread at the crash
    os.write(2, b"native line %05d of a crashing process, written straight to file descriptor 2\n" % i)
os.write(2, b"[a native line cut short by the crash")
print("python's own stderr", file=sys.stderr, flush=True)
os.abort()
"""


def test_native_stderr_filter_drops_only_the_benign_line_and_keeps_a_crashing_process_last_words() -> None:
    """The forwarder is a process of its own: what kdpipe wrote to fd 2 before it died (SIGABRT)
    still reaches the console in full, the half-written last line included; only Ray's benign line
    is left out."""
    out = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, timeout=120)
    assert out.returncode == -6, out.stderr[-2000:]  # SIGABRT
    err = out.stderr.decode()
    assert "native before" in err and "python's own stderr" in err
    assert "max_restarts > 0" not in err
    lines = [line for line in err.splitlines() if line.startswith("native line ")]
    assert len(lines) == 3000 and lines[-1].startswith("native line 02999"), (len(lines), err[-500:])
    assert "[a native line cut short by the crash" in err  # held back (it could have been Ray's) until the end


@pytest.mark.slow  # the default suite checks the same console on `kdpipe run`: tests/test_plugin_one_file.py
def test_the_kdpipe_command_keeps_rays_benign_native_line_off_the_console(tmp_path: Path) -> None:
    """`kdpipe teach` as a user runs it: its teacher pool makes Ray's core worker log the line, and
    the command's console does not show it."""
    sets = [a for k, v in tiny_overrides(tmp_path).items() for a in ("--set", f"{k}={json.dumps(v)}")]
    out = subprocess.run(
        [str(BIN / "kdpipe"), "teach", str(ROOT / "pipelines" / "digits_kd.yaml"), *sets],
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "taught 1797 new rows" in out.stdout and RAY_RESTART_LINE not in out.stderr, out.stderr[-3000:]

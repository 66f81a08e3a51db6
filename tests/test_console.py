"""The console a newcomer sees: Ray Data's per-dataset lines and two benign warnings are kept off
it (still in Ray's session logs), real warnings still reach it, and `-v` keeps everything."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging, sys
from kdpipe.console import configure
configure(verbose=sys.argv[1] == "1")
import ray
ray.init(num_cpus=1, include_dashboard=False)
ray.data.range(10).materialize()  # Ray Data logs "execution finished" at INFO
logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, ...")
logging.getLogger("ray.data.foo").warning("a real Ray Data warning")
logging.getLogger("ray._private.x").warning("a real Ray warning")
logging.getLogger("kdpipe.teach").info("kdpipe's own line")
ray.shutdown()
"""


def _run(verbose: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_DATA_LOGGING_CONFIG", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if verbose else "0"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def test_quiet_console_keeps_what_matters_and_verbose_keeps_everything() -> None:
    quiet = _run(False)
    assert "kdpipe's own line" in quiet and "a real Ray Data warning" in quiet and "a real Ray warning" in quiet
    assert "execution finished" not in quiet and "Progress bars disabled" not in quiet
    assert "Token authentication is enabled" not in quiet
    loud = _run(True)
    assert "execution finished" in loud and "Progress bars disabled" in loud

"""The console a newcomer sees: Ray Data's per-dataset lines, benign warnings and transformers'
weight-loading bars are kept off it (Ray's lines still in its session logs), real warnings still
reach it; `-v` keeps everything."""

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
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if verbose else "0"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def test_quiet_console_keeps_what_matters_and_ray_data_logs_the_rest_to_its_file() -> None:
    quiet = _run(False)
    assert "kdpipe's own line" in quiet and "a real Ray Data warning" in quiet and "a real Ray warning" in quiet
    assert "execution finished" not in quiet and "Progress bars disabled" not in quiet
    assert "Token authentication is enabled" not in quiet and "does not have any available CPUs" not in quiet
    assert "HF_BARS False" in quiet and "HF_BARS True" in _run(True)  # transformers' "Loading weights" bars
    # the lines kept off the console were emitted: they are in the session's ray-data.log
    from pathlib import Path

    session = Path([line for line in quiet.splitlines() if line.startswith("SESSION ")][-1].split(" ", 1)[1])
    logged = "".join(p.read_text(errors="replace") for p in session.rglob("ray-data*.log"))
    assert "execution finished" in logged and "Progress bars disabled" in logged

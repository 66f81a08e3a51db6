"""`kdpipe run SPEC` in this process with the pipeline's stage functions timed (used by
`bench/pipeline_runs.py`): where a run's seconds go, written as JSON to OUT.

    python -m bench.stage_timer SPEC OUT

The stages are the module functions `kdpipe.pipeline.run` calls by name, so wrapping the modules'
attributes times exactly what a `kdpipe run` does; nothing else changes. The JSON holds each stage's
seconds (summed over calls), the seconds from this module's import to the CLI's return, and the CLI's
exit code. What happens before (interpreter start-up) and after (teardown) is the caller's wall time
minus `in_process_s`.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0 = time.perf_counter()

# (module, function): `distil` imports `build_views` inside its body, so that one is wrapped where it lives
STAGES = (
    ("kdpipe.pipeline", "prepare"),
    ("kdpipe.pipeline", "teach"),
    ("kdpipe.views", "build_views"),
    ("kdpipe.pipeline", "student_meta"),
    ("kdpipe.pipeline", "open_run"),
    ("kdpipe.pipeline", "pretrain_modules"),
    ("kdpipe.pipeline", "train_students"),
    ("kdpipe.pipeline", "contenders"),
    ("kdpipe.pipeline", "score"),
    ("kdpipe.pipeline", "log_figures"),
    ("kdpipe.pipeline", "ship"),
    ("kdpipe.runtime", "stop_local_ray"),
)


def timed(fn: Callable[..., Any], name: str, seconds: dict[str, float]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - t

    return wrapper


def main(argv: list[str]) -> int:
    spec, out = argv
    import importlib

    from kdpipe.cli import main as cli

    seconds: dict[str, float] = defaultdict(float)
    for module, name in STAGES:
        mod = importlib.import_module(module)
        setattr(mod, name, timed(getattr(mod, name), name, seconds))
    rc = cli(["run", spec])
    gc.freeze()  # as the `kdpipe` command does (kdpipe.cli.entry): no final garbage collection at exit
    result = {
        "stages_s": {k: round(seconds[k], 2) for _, k in STAGES if k in seconds},
        "in_process_s": round(time.perf_counter() - T0, 2),
        "rc": rc,
    }
    Path(out).write_text(json.dumps(result, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the end of `kdpipe run pipelines/digits_kd.yaml` costs (issue 13), from the demo itself:

- `shutdown`: seconds of `ray.shutdown()` per kind of process the embedded Ray started (Ray's
  `Node._kill_process_type`, timed around each call), as `kdpipe` stops Ray after a command;
- `exit`: seconds from the CLI's return to the process's end, with `gc.freeze()` before exiting
  (what the `kdpipe` command does, `kdpipe.cli.entry`) and without it (the interpreter's final
  garbage collection walks every object the run left).

Each run is a fresh process in an empty directory (the teacher trained too, as `make demo` does);
the two exits alternate so that drift in the machine's load hits both. Run it on an idle machine.

    python bench/exit_cost.py [--repeat N]

Writes bench/results/exit_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_env, save, short_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import gc, json, sys, time
from ray._private import node

kills = {}
kill = node.Node._kill_process_type

def timed(self, kind, *a, **k):
    t = time.perf_counter()
    try:
        return kill(self, kind, *a, **k)
    finally:
        kills[kind] = round(kills.get(kind, 0.0) + time.perf_counter() - t, 3)

node.Node._kill_process_type = timed
from kdpipe.cli import main

rc = main(["run", sys.argv[1]])
print(json.dumps({"rc": rc, "kills": kills, "end": time.time()}), flush=True)
if sys.argv[2] == "freeze":
    gc.freeze()
sys.exit(rc)
"""


def one(freeze: bool) -> dict[str, Any]:
    """One demo run; the seconds of its shutdown by process kind and of its exit."""
    with tempfile.TemporaryDirectory(prefix="kdpipe-exit-") as cwd:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(ROOT / "pipelines" / "digits_kd.yaml"),
                "freeze" if freeze else "collect",
            ],
            cwd=cwd,
            env={**fresh_env(), "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        ended = time.time()
    if out.returncode != 0:
        raise RuntimeError(f"demo failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    rec = json.loads([line for line in out.stdout.splitlines() if line.startswith('{"rc"')][-1])
    return {
        "exit_s": round(ended - rec["end"], 2),
        "shutdown_s": round(sum(rec["kills"].values()), 2),
        "shutdown_by_process_s": rec["kills"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"gc_freeze": [], "final_gc": []}
    for _ in range(args.repeat):
        for side, freeze in (("gc_freeze", True), ("final_gc", False)):
            runs[side].append(one(freeze))
            print(side, runs[side][-1], flush=True)
    res = {
        side: {
            "exit_s": statistics.median(r["exit_s"] for r in rs),
            "shutdown_s": statistics.median(r["shutdown_s"] for r in rs),
        }
        for side, rs in runs.items()
    }
    print(
        save(
            "exit_cost", {"command": "python bench/exit_cost.py", "commit": short_commit(), "median": res, "runs": runs}
        )
    )


if __name__ == "__main__":
    main()

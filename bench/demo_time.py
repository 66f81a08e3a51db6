"""End-to-end seconds of the demo, `kdpipe run pipelines/digits_kd.yaml`, before and after a change,
side by side in one run of this script (issue 13).

    python bench/demo_time.py [--before REF] [--after REF] [--repeat N]

Each side is a `git worktree` of its commit; the demo runs there with `python -m kdpipe.cli`
(the worktree's code, this venv's packages), from an empty directory, fresh Ray and MLflow each
time, the teacher trained from scratch: exactly what `make demo` does after installation. The
two sides alternate (before, after, before, …) so drift in the machine's load hits both.
Writes bench/results/demo_time.json: `before_s`/`after_s` (median), every run, and both results
tables, which must be equal (same seed, same numbers).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_env, results_table, save, short_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEFORE = (
    "bb9da04"  # the last commit before the local Ray Train poll of 0.2 s (290294b: before one shared Ray Train run)
)


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where), ref], check=True, capture_output=True
    )
    return where


def demo(code: Path) -> tuple[float, str]:
    """Seconds of one demo run with the code at `code`, and its results table."""
    with tempfile.TemporaryDirectory(prefix="kdpipe-demo-") as cwd:
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "kdpipe.cli", "run", str(code / "pipelines" / "digits_kd.yaml")],
            cwd=cwd,
            env={**fresh_env(), "PYTHONPATH": str(code)},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"demo at {code} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, results_table(out.stdout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    runs: dict[str, list[float]] = {"before": [], "after": []}
    tables: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kdpipe-wt-") as wt:
        trees = {side: worktree(ref, Path(wt) / side) for side, ref in (("before", args.before), ("after", args.after))}
        try:
            for _ in range(args.repeat):
                for side, code in trees.items():
                    seconds, table = demo(code)
                    runs[side].append(round(seconds, 1))
                    tables[side] = table
                    print(f"{side}: {seconds:.1f} s", flush=True)
        finally:
            for code in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(code)], capture_output=True
                )
    refs = {side: short_commit(ref) for side, ref in (("before", args.before), ("after", args.after))}
    result = {
        "before_s": statistics.median(runs["before"]),
        "after_s": statistics.median(runs["after"]),
        "runs_s": runs,
        "refs": refs,
        "same_table": tables["before"] == tables["after"],
        "tables": tables,
        "command": "kdpipe run pipelines/digits_kd.yaml (from an empty directory, teacher trained from scratch)",
    }
    print(
        f"before {result['before_s']:.1f} s  after {result['after_s']:.1f} s  "
        f"({result['before_s'] / result['after_s']:.2f}x); same table: {result['same_table']}"
    )
    save("demo_time", result)


if __name__ == "__main__":
    main()

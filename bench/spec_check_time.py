"""How long `kdpipe validate SPEC` takes to report a spec error, as a user runs it (a new process).

The spec's shape, its plugin names and its data paths are checked before torch, Ray or MLflow are
imported; a plugin's own params need the plugin's module (and so torch), not Ray or MLflow. Each
case is timed as a whole process, several runs, median quoted: `median_s` is the typical spec
error (an unknown key), `slowest_error_s` the slowest kind of error, and `over_goal` names every
kind whose median misses the goal.

    python bench/spec_check_time.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import save

ROOT = Path(__file__).resolve().parent.parent
KDPIPE = ROOT / ".venv" / "bin" / "kdpipe"
GOAL_S = 1.0  # issue 29: spec errors in under 1 s


def cases(work: Path) -> dict[str, Path]:
    base = yaml.safe_load((ROOT / "pipelines" / "digits_kd.yaml").read_text())
    specs = {
        "unknown_key": {**base, "train": {**base["train"], "epocs": 3}},
        "wrong_type": {**base, "train": {**base["train"], "epochs": "many"}},
        "unknown_loss": {**base, "losses": [{"name": "kdd", "temperature": 4.0}]},
        "missing_data_file": {**base, "source": {"kind": "csv", "path": "no/such/file.csv", "features": ["a"]}},
        "bad_plugin_param": {**base, "losses": [{"name": "kd", "temperature": -1}]},
        "valid_spec": base,
    }
    out = {}
    for name, spec in specs.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        out[name] = path
    return out


def time_case(spec: Path, runs: int) -> dict[str, object]:
    walls, codes, last = [], set(), ""
    for _ in range(runs + 1):  # the first run warms the page cache and is not counted
        t = time.perf_counter()
        done = subprocess.run([str(KDPIPE), "validate", str(spec)], capture_output=True, text=True, cwd=ROOT)
        walls.append(time.perf_counter() - t)
        codes.add(done.returncode)
        last = (done.stderr or done.stdout).strip().splitlines()[-1] if (done.stderr or done.stdout).strip() else ""
    walls = walls[1:]
    return {
        "median_s": round(statistics.median(walls), 3),
        "min_s": round(min(walls), 3),
        "max_s": round(max(walls), 3),
        "runs": len(walls),
        "exit_codes": sorted(codes),
        "message": last[:300],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        results = {name: time_case(path, args.runs) for name, path in cases(Path(d)).items()}
    for name, r in results.items():
        print(f"{name:18s} median {r['median_s']:.3f} s  exit {r['exit_codes']}  {r['message'][:100]}")
    out = {
        "what": "wall seconds of `kdpipe validate SPEC` as a new process, per kind of spec error",
        "command": "python bench/spec_check_time.py",
        "median_s": results["unknown_key"]["median_s"],
        "goal_s": GOAL_S,
        "slowest_error_s": max(r["median_s"] for n, r in results.items() if n != "valid_spec"),
        "over_goal": sorted(n for n, r in results.items() if r["median_s"] > GOAL_S),
        "cases": results,
    }
    print(save("spec_check_time", out))


if __name__ == "__main__":
    main()

"""The longest silence on the console of a run, as a user watches it: `max_silence_s`.

Runs `kdpipe run` as a new process from an empty directory (the teacher is trained from scratch)
and timestamps every console line as it arrives; the largest gap between two lines (and from the
start to the first) is the silence a person sits through. Two runs: the demo
(`pipelines/digits_kd.yaml`), and a user's own table as the reference describes it — 20,000 rows,
an id column, 20 numeric feature columns and a class column with 80 % of its labels missing,
built from scikit-learn's real digits (20 of the 64 pixel columns; copies shifted by 1e-4 so that
rows stay distinct), written as a CSV file.

    python bench/console_silence.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import fresh_env, save

ROOT = Path(__file__).resolve().parent.parent
KDPIPE = ROOT / ".venv" / "bin" / "kdpipe"
OWN_TABLE_SPEC = """
name: own_table
storage: .kdpipe
source:
  kind: csv
  path: data/readings.csv
  id_column: reading_id
  features: {prefix: f_}
  label: state
teachers:
  - id: mlp
    kind: mlp_classifier
    params: {hidden: [256, 256], epochs: 300}
    outputs: [logits]
student:
  kind: mlp
  params: {hidden: [32]}
losses:
  - {name: kd, temperature: 4.0}
  - {name: ce}
train: {epochs: 20, lr: 0.005}
tracking:
  model_name: own-table
"""


def own_table(path: Path, rows: int = 20_000, features: int = 20, labeled: float = 0.2) -> None:
    import pandas as pd
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(rows)
    cols = np.linspace(0, 63, features).astype(int)
    x = d.data[idx % len(d.data)][:, cols] / 16.0 + (idx // len(d.data))[:, None] * 1e-4
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    keep = np.random.default_rng(0).random(rows) < labeled
    df = pd.DataFrame(x, columns=[f"f_{i:02d}" for i in range(features)])
    df.insert(0, "reading_id", [f"r{i:06d}" for i in idx])
    df["state"] = [names[t] if k else None for t, k in zip(d.target[idx % len(d.data)], keep)]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)


def watch(cmd: list[str], cwd: Path) -> dict[str, object]:
    """Run `cmd`, timestamp each console line; the largest gap and the lines around it."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=fresh_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip()))
    proc.wait()
    end = time.monotonic() - start
    stamps = [0.0] + [t for t, _ in lines] + [end]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    worst = int(np.argmax(gaps))
    before = lines[worst - 1][1] if worst >= 1 else "(start)"
    after = lines[worst][1] if worst < len(lines) else "(end)"
    return {
        "exit_code": proc.returncode,
        "wall_s": round(end, 1),
        "lines": len(lines),
        "max_silence_s": round(max(gaps), 2),
        "silence_after": before[-200:],
        "silence_before": after[-200:],
        "gaps_over_10s": sum(g > 10 for g in gaps),
    }


def main() -> None:
    out: dict[str, object] = {
        "what": "the largest gap (s) between console lines of `kdpipe run`, a new process from an empty directory",
        "command": "python bench/console_silence.py",
        "goal_s": 10.0,
    }
    with tempfile.TemporaryDirectory() as d:
        demo = Path(d) / "demo"
        demo.mkdir()
        out["demo"] = watch([str(KDPIPE), "run", str(ROOT / "pipelines" / "digits_kd.yaml")], demo)
        table = Path(d) / "table"
        own_table(table / "data" / "readings.csv")
        (table / "spec.yaml").write_text(OWN_TABLE_SPEC)
        out["own_table"] = watch([str(KDPIPE), "run", "spec.yaml"], table)
    out["max_silence_s"] = max(out["demo"]["max_silence_s"], out["own_table"]["max_silence_s"])  # type: ignore[index]
    print(json.dumps(out, indent=2))
    print(save("console_silence", out))
    sys.exit(0 if all(out[k]["exit_code"] == 0 for k in ("demo", "own_table")) else 1)  # type: ignore[index]


if __name__ == "__main__":
    main()

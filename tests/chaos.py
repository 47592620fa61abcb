"""The chaos run: one Ray training run, two workers on two nodes, reading its shards from the S3 store, under a
seeded schedule of faults. ``bench/chaos.py`` runs a long schedule; the test suite a short one
(tests/integration/test_many_nodes.py). Both use ``ChaosRun``.

Faults, each at a step of the schedule:

- ``worker-kill`` / ``worker-term``: SIGKILL / SIGTERM to one Ray Train worker process (a lost process; a node
  drain or a spot notice). Fired once the checkpoint before the step is committed: a crash during an upload is
  ``tear``'s case.
- ``driver-term``: SIGTERM to the driver (``python -m orchestrator.pretrain``), then the same command again.
- ``node-loss``: the second node's raylet SIGKILLed (its worker goes with it); once the run goes on with one
  worker, the node is started again and the run grows back to two (``scaling.num_workers=[1, 2]``).
- ``store-restart``: the S3 store stopped mid-epoch until a read of the run has failed against it, then started
  again: the run must retry through it without a restart.
- ``tear`` / ``bit-flip`` / ``stall`` / ``stall-loader``: injected in the workers (``orchestrator.faults``:
  ``tear``, ``flip``, ``stall`` in the training thread, ``stall-loader`` in a DataLoader worker) at a checkpoint
  step.

The run's folder is on local disk (a shared file system on a cluster), so every logged step can be watched.
A fault is over when the run has logged a step after its last restart; the next one fires after that.
"""

from __future__ import annotations

import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import faults
from orchestrator.rundir import MARKER, STATE, RunDir
from tests.services import RayCluster, RayWorkerNode, S3Store

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("worker-kill", "worker-term", "driver-term", "node-loss", "store-restart", "tear", "bit-flip", "stall",
         "stall-loader")
INJECTED = {"tear": "tear", "bit-flip": "flip", "stall": "stall", "stall-loader": "stall-loader"}  # -> faults.py kind
STEPS_PER_EPOCH = 10  # 320 images, global batch 32
STALL_SLACK_S = 5  # a stall is found within run.stall_timeout_s and this (the watchdog's check, writing stacks)
REGROW_STEPS = 120  # measured: the group grew back 28 and 56 steps after the shrink (10-20 s)
FAULT_TIMEOUT_S = 300  # one fault's recovery; more is a failure of the run
STORE_DOWN_S = 20  # the longest the store stays down waiting for a request of the run to fail
RETRY_LINE = "; retrying in "  # storage.with_retries' warning: "<what>: attempt N failed (<why>); retrying in ..."


WORLD_SIZE_TOLERANCE = 5e-3  # parameter_distance after a world-size change: see test_world_sizes


class ChaosError(AssertionError):
    pass


@dataclass
class Fault:
    kind: str
    step: int  # fires once the run logs this step (an injected one: right after this step's checkpoint)
    rank: int = 0  # injected faults: the rank; worker faults: which worker process (by PID order)
    fired_at: float | None = None
    acted_at: float | None = None  # when the harness's part was done (the store is back)
    high: int = 0  # the newest step logged when it fired
    committed: int = 0  # the newest committed checkpoint when it fired
    resumes: list[dict[str, Any]] = field(default_factory=list)  # the restarts it caused
    redone: list[int] = field(default_factory=list)  # steps trained again, per restart
    recovered_s: float | None = None
    phase: str = "pending"  # pending, fired, regrow (node-loss: the node is back), done
    evidence: int = 0  # that it did something: requests that failed while the store was down; a torn object seen
    ok: bool | None = None  # its own checks (``ChaosRun.check``)


def schedule(seed: int, count: int, kinds: tuple[str, ...], every: int) -> list[Fault]:
    """``count`` faults drawn from ``kinds`` (each kind once before any twice), at increasing steps: the first
    after two checkpoints, then every ``every + 3`` to ``2 * every + 3`` steps (a graceful stop takes two steps
    to agree and checkpoint; the next fault must not fire before the last is over); injected ones at
    checkpoint steps. A node loss, if drawn, comes last, once: the run then trains on one worker, much faster
    than on two, until Ray has seen the node back and grown the group (20-30 s here), so REGROW_STEPS follow."""
    rng = random.Random(seed)
    others = tuple(k for k in kinds if k != "node-loss")
    count -= "node-loss" in kinds
    drawn: list[str] = []
    while len(drawn) < count:
        drawn += rng.sample(others, min(len(others), count - len(drawn)))
    drawn += ["node-loss"] if "node-loss" in kinds else []
    out, step = [], 2 * every
    for kind in drawn:
        step += rng.randint(every + 3, 2 * every + 3)
        if kind in INJECTED:
            step = math.ceil(step / every) * every
        out.append(Fault(kind, step, rank=0 if kind in ("tear", "bit-flip") else rng.randint(0, 1)))
    return out


def epochs_for(plan: list[Fault], every: int) -> int:
    """Epochs long enough to train ``2 * every`` steps past the last fault (and to grow back after a node loss)."""
    tail = 2 * every + (REGROW_STEPS if plan[-1].kind == "node-loss" else 0)
    return math.ceil((plan[-1].step + tail) / STEPS_PER_EPOCH)


@dataclass
class ChaosRun:
    """Drives one run through ``plan``; ``run()`` returns when its driver exits 0, raising ChaosError when a
    fault is not recovered from within FAULT_TIMEOUT_S or the driver fails."""

    head: RayCluster
    node: RayWorkerNode
    store: S3Store
    settings: list[str]  # the run's --set arguments (data on the store, run folder on local disk)
    run_dir: Path
    plan: list[Fault]
    every: int
    work: Path  # markers and the driver's log
    stall_s: float = 10.0  # run.stall_timeout_s of ``settings``
    log: Any = print
    _high: int = 0
    _seen: set[float] = field(default_factory=set)  # resume records by time
    _driver: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "orchestrator.pretrain", str(ROOT / "recipes" / "smoke.yaml"), "--set", *self.settings]

    def start_driver(self) -> None:
        spec = ",".join(f"{INJECTED[f.kind]}:{f.step}:{f.rank}:{self.marker(f)}" for f in self.plan if f.kind in INJECTED)
        env = {**self.head.env, faults.ENV: spec}
        with open(self.work / "driver.log", "ab") as out:
            self._driver = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def marker(self, fault: Fault) -> Path:
        return self.work / f"fault-{self.plan.index(fault)}-{fault.kind}"

    def run(self) -> None:
        self.start_driver()
        try:
            while True:
                code = self._driver.poll()
                records = self.observe()
                current = next((f for f in self.plan if f.phase not in ("pending", "done")), None)
                if code is not None:
                    if current is not None and current.kind == "driver-term" and code == 143:
                        self.log("  driver stopped with 143; the same command again")
                        self.start_driver()
                        continue
                    if code != 0:
                        raise ChaosError(f"the driver exited with {code}; see {self.work / 'driver.log'}")
                    break
                if current is not None:
                    self.advance(current, records)
                else:
                    pending = next((f for f in self.plan if f.phase == "pending"), None)
                    if pending is not None:
                        self.maybe_fire(pending)
                time.sleep(0.1)
        finally:
            if self._driver is not None and self._driver.poll() is None:
                os.killpg(self._driver.pid, signal.SIGKILL)
                self._driver.wait()
        unfired = [f"{f.kind}@{f.step}" for f in self.plan if f.phase != "done"]
        if unfired:
            raise ChaosError(f"the run ended before these faults were over: {unfired}")

    def observe(self) -> list[dict[str, Any]]:
        """The run's records; new restarts are given to the fault in progress with the steps they redo."""
        records = RunDir(str(self.run_dir)).records()
        current = next((f for f in reversed(self.plan) if f.fired_at is not None), None)
        for r in records:
            if r.get("kind") == "train":
                self._high = max(self._high, r["step"])
            elif r.get("kind") == "resume" and r["time"] not in self._seen:
                self._seen.add(r["time"])
                if current is None:
                    raise ChaosError(f"a restart before any fault: {r}")
                current.resumes.append(r)
                current.redone.append(self._high - r["step"])
                self.log(f"  resumed at step {r['step']} on {r['world_size']} worker(s), {self._high - r['step']} "
                         f"step(s) redone")
                self._high = r["step"]
        return records

    def maybe_fire(self, fault: Fault) -> None:
        if fault.kind in INJECTED:
            marker = self.marker(fault)
            if marker.exists():  # the worker fired it
                self.fired(fault, marker.stat().st_mtime)
            return
        if self._high < fault.step:
            return
        committed = [c.step for c in RunDir(str(self.run_dir)).committed()]
        if not committed or committed[-1] < self._high - self._high % self.every:
            return  # a checkpoint is being uploaded
        self.fired(fault, time.time(), committed[-1])
        if fault.kind in ("worker-kill", "worker-term"):
            pid = self.worker_pid(fault.rank)
            os.kill(pid, signal.SIGKILL if fault.kind == "worker-kill" else signal.SIGTERM)
        elif fault.kind == "driver-term":
            self._driver.send_signal(signal.SIGTERM)
        elif fault.kind == "node-loss":
            self.node.kill_raylet()
        elif fault.kind == "store-restart":
            self.restart_store(fault)
        fault.acted_at = time.time()

    def restart_store(self, fault: Fault) -> None:
        """Stop the store until a request of the run has failed against it (its retry logged), then start it: the
        run must retry through the outage. (Not longer: the reader's retries last about 30 s.)"""
        before = self.driver_log().count(RETRY_LINE)
        self.store.stop()
        deadline = time.monotonic() + STORE_DOWN_S
        while (failed := self.driver_log().count(RETRY_LINE) - before) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        fault.evidence = failed
        self.store.start()

    def fired(self, fault: Fault, when: float, committed: int | None = None) -> None:
        fault.fired_at, fault.acted_at, fault.high, fault.phase = when, when, self._high, "fired"
        fault.committed = committed if committed is not None else fault.step
        at = fault.step if fault.kind in INJECTED else self._high
        self.log(f"fault {self.plan.index(fault) + 1}/{len(self.plan)}: {fault.kind} at step {at}")

    def worker_pid(self, index: int) -> int:
        from ray.util.state import list_actors

        workers = list_actors(address=self.head.dashboard,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        pids = sorted(w.pid for w in workers)
        if not pids:
            raise ChaosError("no live Ray Train worker to signal")
        return pids[index % len(pids)]

    def advance(self, fault: Fault, records: list[dict[str, Any]]) -> None:
        """Move ``fault`` on: restart what the fault took away (the node), and mark it over once the run has
        logged a step after its last restart (a store restart may need none)."""
        assert fault.fired_at is not None
        if time.time() - fault.fired_at > FAULT_TIMEOUT_S:
            raise ChaosError(f"{fault.kind} at step {fault.step}: not recovered after {FAULT_TIMEOUT_S} s; "
                             f"see {self.work / 'driver.log'}")
        if fault.kind == "node-loss" and fault.phase == "fired":
            if any(r["world_size"] == 1 for r in fault.resumes):
                self.node.start()
                fault.phase = "regrow"
            return
        if fault.kind == "node-loss":  # over once grown back (the run may have trained its last step by then)
            if any(r["world_size"] == 2 for r in fault.resumes):
                fault.recovered_s, fault.phase = fault.resumes[-1]["time"] - fault.fired_at, "done"
            return
        if fault.kind == "tear" and not fault.resumes:  # what the restart must skip: a torn, uncommitted upload
            folder = self.run_dir / "checkpoints" / f"step-{fault.step:08d}"
            fault.evidence = max(fault.evidence, int((folder / STATE).exists() and not (folder / MARKER).exists()))
        if not fault.resumes and fault.kind != "store-restart":
            return
        after = fault.resumes[-1]["time"] if fault.resumes else fault.acted_at
        first = next((r for r in records if r.get("kind") == "train" and r["time"] > after), None)
        if first is not None:
            fault.recovered_s, fault.phase = first["time"] - fault.fired_at, "done"

    def check(self) -> None:
        """Each fault restarted the run from the checkpoint it should have: the newest committed one when it
        fired; the one before a torn or flipped checkpoint; a graceful stop's own, past the newest committed one."""
        problems = []
        for f in self.plan:
            got = [r["step"] for r in f.resumes]
            want: Any = {"worker-kill": [f.committed], "tear": [f.step - self.every], "bit-flip": [f.step - self.every],
                         "stall": [f.step], "stall-loader": [f.step]}.get(f.kind)
            if f.kind in ("worker-term", "driver-term"):
                ok = len(got) == 1 and got[0] > f.committed
            elif f.kind == "node-loss":
                ok = got[:1] == [f.committed] and [r["world_size"] for r in f.resumes][-1] == 2 \
                    and f.resumes[0]["world_size"] == 1
            elif f.kind == "store-restart":  # requests failed while it was down, and the run retried through them
                ok = f.evidence > 0 and not got
                want = "no restart" + ("" if f.evidence else ", and a request failed while the store was down (none did)")
            else:
                ok = got == want
            if f.kind == "tear" and not f.evidence:
                ok, want = False, f"{want}, and a torn uncommitted state.pt at step {f.step} (none was seen)"
            if f.kind == "bit-flip" and f"step-{f.step:08d}: state.pt does not match the sha256" not in self.driver_log():
                ok = False  # the flipped checkpoint was skipped, named
            if f.kind in ("stall", "stall-loader") and not self.stall_found(f):
                ok = False  # the stalled rank's stacks, naming the injected frame, within the timeout and slack
            f.ok = ok
            if not ok:
                problems.append(f"{f.kind} at step {f.step} (fired at {f.high}, newest checkpoint {f.committed}): "
                                f"resumed at {got}" + (f", expected {want}" if want else ""))
        if problems:
            raise ChaosError("; ".join(problems))

    def stall_found(self, fault: Fault) -> bool:
        """The stalled rank's stacks name the injected frame (a DataLoader worker's, for ``stall-loader``), written
        within the timeout and a slack of the stall: of its last step (a worker stalls ahead, on prefetch)."""
        assert fault.fired_at is not None
        where = "DataLoader worker (pid " if fault.kind == "stall-loader" else ""
        last = [r["time"] for r in RunDir(str(self.run_dir)).records() if r.get("kind") == "train" and r["step"] == fault.step]
        since = max([fault.fired_at, *last])
        return any("in maybe_stall" in f.read_text().split(where, 1)[-1]
                   and f.stat().st_mtime - since <= self.stall_s + STALL_SLACK_S
                   for f in self.run_dir.glob(f"stalls/*/rank-{fault.rank}.txt"))

    def driver_log(self) -> str:
        return (self.work / "driver.log").read_text(errors="replace")

    def table(self) -> str:
        rows = [f"{'fault':<14} {'count':>5} {'steps redone':>13} {'recover s median':>17} {'max':>6}"]
        for kind in KINDS:
            done = [f for f in self.plan if f.kind == kind]
            if not done:
                continue
            seconds = [f.recovered_s for f in done if f.recovered_s is not None]
            rows.append(f"{kind:<14} {len(done):>5} {sum(sum(f.redone) for f in done):>13} "
                        f"{statistics.median(seconds):>17.1f} {max(seconds):>6.1f}")
        return "\n".join(rows)

    def summary(self) -> str:
        seconds = [f.recovered_s for f in self.plan if f.recovered_s is not None]
        redone = [n for f in self.plan for n in f.redone] or [0]
        failed = [f"{f.kind}@{f.step}" for f in self.plan if not f.ok]
        return (f"faults={len(self.plan)} survived={sum(bool(f.ok) for f in self.plan)} "
                f"max_steps_redone={max(redone)} recovery_s_median={statistics.median(seconds):.1f}"
                + (f" failed={','.join(failed)}" if failed else ""))


def write_data(store: S3Store) -> str:
    """The test dataset (320 train / 80 val images of 32 px, 16-row groups) in the store; returns its URL."""
    from orchestrator.data.shard_writer import WriteOptions, write_dataset
    from orchestrator.data.synth import SynthSource

    url = f"{store.bucket('chaos-data')}/synth"
    write_dataset(SynthSource(classes=10, train=320, val=80, size=32), url,
                  WriteOptions(shard_size_mb=0.08, rows_per_group=16, seed=0), store.options)
    return url


def settings(store: S3Store, data: str, storage: Path, name: str, plan: list[Fault], every: int,
             stall_s: float) -> list[str]:
    """Two workers of 2 CPUs (one per node), micro-batches of 16, a step logged each step; elastic down to one
    worker when the plan loses a node. The data's storage options name the store (the store restarts on the
    same port)."""
    options = "{" + ", ".join(f"{k}: {v}" for k, v in store.options.items()) + "}"
    workers = "[1, 2]" if any(f.kind == "node-loss" for f in plan) else "2"
    return [f"data.train={data}/train", f"data.val={data}/val", f"data.storage_options={options}",
            "data.input_size=32", "data.num_workers=1", "data.shuffle_buffer=64", "batch.global_batch_size=32",
            "batch.per_device_max=16", f"schedule.epochs={epochs_for(plan, every)}", "run.log_every_steps=1",
            f"run.checkpoint_every_steps={every}", "run.keep_checkpoints=2", f"run.stall_timeout_s={stall_s}",
            f"run.storage={storage}", f"run.name={name}", f"scaling.num_workers={workers}", "scaling.cpus_per_worker=2",
            "scaling.resize_check_s=1", f"scaling.max_failures={4 * len(plan)}"]


def reference_run(head: RayCluster, run_settings: list[str], work: Path) -> None:
    """The same run uninterrupted: two torchrun processes of 2 threads each, as the two Ray workers of 2 CPUs
    (the same computation, bitwise; three times faster here than starting Ray workers), or, for an elastic run
    (whose weights are compared within the world-size tolerance), one local process."""
    elastic = "scaling.num_workers=[1, 2]" in run_settings
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={1 if elastic else 2}",
               "-m", "orchestrator.pretrain", str(ROOT / "recipes" / "smoke.yaml"), "--launcher=local", "--set",
               *run_settings]
    with open(work / "reference.log", "wb") as out:
        done = subprocess.run(command, cwd=ROOT, env={**head.env, "OMP_NUM_THREADS": "2"}, stdout=out,
                              stderr=subprocess.STDOUT, timeout=900)
    if done.returncode:
        raise ChaosError(f"the reference run exited with {done.returncode}; see {work / 'reference.log'}")


def verify(chaos: ChaosRun, reference: Path) -> None:
    """Every step logged once, with the reference's samples; the reference's weights (bitwise on an unchanged
    world size); each fault resumed where it should and cost at most ``every`` steps a restart."""
    import torch
    from safetensors.torch import load_file

    from tests.integration.test_world_sizes import digests, parameter_distance

    chaos.check()
    steps = [r["step"] for r in RunDir(str(chaos.run_dir)).records() if r["kind"] == "train"]
    if steps != list(range(1, len(steps) + 1)):
        raise ChaosError(f"steps logged: {steps}")
    if digests(chaos.run_dir) != digests(reference):
        raise ChaosError("the samples of some step differ from the uninterrupted run's")
    redone = {f"{f.kind}@{f.step}": f.redone for f in chaos.plan if any(n > chaos.every for n in f.redone)}
    if redone:
        raise ChaosError(f"restarts that redid more than run.checkpoint_every_steps={chaos.every} steps: {redone}")
    if all(r["world_size"] == 2 for f in chaos.plan for r in f.resumes):
        a, b = load_file(chaos.run_dir / "model.safetensors"), load_file(reference / "model.safetensors")
        if [k for k in a if not torch.equal(a[k], b[k])]:
            raise ChaosError("the final weights differ from the uninterrupted run's")
    elif (distance := parameter_distance(chaos.run_dir, reference)) >= WORLD_SIZE_TOLERANCE:
        raise ChaosError(f"the final weights are {distance:.2e} from the uninterrupted run's")

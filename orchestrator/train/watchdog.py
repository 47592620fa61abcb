"""The stall watchdog: a run that stops making progress without dying is ended in minutes, not hours.

Progress is a counter the loop advances with every training and evaluation micro-batch and every chunk of
a checkpoint upload (``Watchdog.tick``). A daemon thread looks at it every few seconds; when it has not
moved for ``run.stall_timeout_s`` (``STARTUP_FACTOR`` times that until the first optimizer step has finished:
building, compiling, the first reads), the thread
- writes the Python stacks of every thread of this process, and of its DataLoader workers (each registers
  faulthandler on a signal at start, ``orchestrator.data.worker_stacks``), to node-local disk first
  (``stall_dir``: the run folder's ``stalls/`` itself when the run folder is local) and then to
  ``<run>/stalls/<utc minute>/rank-<r>.txt`` with a short timeout (the minute is that of the last progress,
  so the ranks of one stall share a folder; the store may be what stalled),
- logs one line naming this rank, the step, the function its training thread is blocked in and the files,
- marks the run ``stalled at step N`` (rank 0; ``orchestrator.runs`` shows it until the run moves again),
- and ends the attempt through the launcher's ``on_stall``: the local launcher exits non-zero, a Ray worker
  exits (Ray Train restarts the worker group from the newest checkpoint, counted against
  ``scaling.max_failures``), a Slurm job requeues itself, as a preempted one does, at most
  ``run.max_stall_restarts`` times.

A hang that holds the GIL (a stuck C extension, a deadlocked library) freezes this thread too: a backstop in C,
``faulthandler.dump_traceback_later(exit=True)``, re-armed whenever the thread sees progress and due
``BACKSTOP_S`` after this thread would have fired, then writes the stacks to a file opened in ``stall_dir`` in
advance and exits; a later start of the run uploads such a file from node-local disk to ``<run>/stalls/``.

Every rank runs one. A rank stuck in its data loader stops ticking; the others then wait in the gradient
all-reduce and stop ticking too, so every rank of the attempt ends within about the timeout. A rank waiting
for rank 0's checkpoint upload (from a save until its next optimizer step, anywhere but in its own data loading)
is not watched: rank 0's upload ticks rank 0's watchdog, which ends the attempt if the upload stalls. The process group's collective timeout
is a minute past the watchdog's (``distributed.collective_timeout``), so no rank outlives it.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.data.worker_stacks import STALL_DIR_ENV, WORKER_STACKS_SIGNAL

log = logging.getLogger(__name__)
CHECK_S = 2.0  # how often the thread looks; detection comes within timeout + CHECK_S (+ the dump's writing)
PEER_GRACE_S = 2 * CHECK_S  # with several ranks: how long the first to fire waits before ending the attempt
STARTUP_FACTOR = 2  # the limit until the first optimizer step has finished (torch.compile, first reads)
BACKSTOP_S = 5.0  # the C backstop fires this long after the Python thread would have (and had time to act)
UPLOAD_S = 20.0  # how long the stacks' upload to the run folder may take before the attempt ends anyway
def stall_dir(run: Any) -> Path:
    """Node-local folder for this run's stack files: the run folder's ``stalls/`` when it is on local disk, else
    a folder of the machine's temporary directory named after the run's URL (the next start uploads from it)."""
    if run.is_local:
        return Path(run.path) / "stalls"
    name = hashlib.sha256(run.url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "inceptionnext-stalls" / name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Watchdog:
    """One per training process; ``start`` it where the loop begins, ``stop`` it when training ends."""

    def __init__(self, timeout_s: float, rank: int, on_stall: Callable[[str], None],
                 write: Callable[[str, bytes], str] | None = None, mark_stalled: Callable[[int], None] | None = None,
                 grace_s: float = 0.0, local_dir: Path | None = None, uploads_local: bool = False) -> None:
        self.timeout_s, self.rank, self.on_stall = timeout_s, rank, on_stall
        # The ranks of one stall stopped ticking at about the same moment, but each thread looks on its own
        # clock: the first to fire waits this long, so that ending the attempt (a Slurm requeue, Ray tearing
        # the group down) does not kill the others before they have written their stacks.
        self.grace_s = grace_s
        self.write, self.mark_stalled = write, mark_stalled  # the run folder's writer; rank 0's status
        self.local_dir, self.uploads_local = local_dir, uploads_local  # uploads_local: local_dir is not the run's
        self.progress, self.step = 0, 0
        self.warm = False  # the first optimizer step has finished (``step_done``)
        self.peer_waiting = False  # from a save until the next step: this rank may wait for rank 0's upload
        self.last = time.monotonic()
        self.last_wall = time.time()
        self._seen = 0
        self._thread_id = threading.get_ident()  # the training thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backstop: Any = None  # the file faulthandler's C backstop writes into
        self._workers: Path | None = None  # where DataLoader workers write their stacks when asked

    def tick(self, step: int | None = None) -> None:
        """Progress (cheap: called for every micro-batch and upload chunk)."""
        self.progress += 1
        if step is not None:
            self.step = step

    def step_done(self) -> None:
        """An optimizer step finished: the start-up limit is over, and any wait for a peer's upload too."""
        self.warm, self.peer_waiting = True, False
        self.progress += 1

    def limit(self) -> float:
        """Seconds without progress that make a stall now."""
        return self.timeout_s * (1 if self.warm else STARTUP_FACTOR)

    def due(self, idle_s: float) -> bool:
        return idle_s >= self.limit() and not self.waits_for_peer()

    def waits_for_peer(self) -> bool:
        """From a save to the next step, a wait for rank 0's upload (in a collective): anywhere but in data loading,
        which is this rank's own and still watched."""
        if not self.peer_waiting:
            return False
        frame = sys._current_frames().get(self._thread_id)
        while frame is not None:
            name = frame.f_code.co_filename
            if f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}" in name or name.endswith(f"{os.sep}data{os.sep}reader.py"):
                return False
            frame = frame.f_back
        return True

    def start(self) -> Watchdog:
        self._thread_id = threading.get_ident()
        self.last, self.last_wall = time.monotonic(), time.time()
        if self.local_dir is not None:
            self._open_backstop()
        self._workers = Path(tempfile.mkdtemp(prefix="inceptionnext-workers-"))
        os.environ[STALL_DIR_ENV] = str(self._workers)  # this process's DataLoader workers open their files there
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._workers is not None:
            shutil.rmtree(self._workers, ignore_errors=True)
            self._workers = None
        if self._backstop is not None:
            faulthandler.cancel_dump_traceback_later()
            name = self._backstop.name
            self._backstop.close()
            self._backstop = None
            with contextlib.suppress(OSError):
                if os.path.getsize(name) == 0:
                    os.remove(name)
                    self.local_dir.rmdir()  # type: ignore[union-attr]  # an empty stalls/ goes too

    def _open_backstop(self) -> None:
        """The backstop's file, opened now (a hung process cannot open one); files of earlier processes of this
        run on this node are uploaded (non-empty: an attempt the backstop ended) or removed (empty: it ended
        otherwise)."""
        assert self.local_dir is not None
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        mine = self.local_dir / f"backstop-{stamp}-rank-{self.rank}-pid-{os.getpid()}.txt"
        try:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            for old in self.local_dir.glob("*-pid-*.txt"):
                if not _alive(int(old.stem.rsplit("-", 1)[1])):
                    with contextlib.suppress(FileNotFoundError):  # another rank of this node collected it first
                        self._collect(old)
            try:
                self._backstop = open(mine, "w+")  # noqa: SIM115
            except FileNotFoundError:  # the folder is shared: another rank's stop removed it while it was empty
                self.local_dir.mkdir(parents=True, exist_ok=True)
                self._backstop = open(mine, "w+")  # noqa: SIM115
            self._arm()
        except OSError as exc:
            log.warning("no C backstop for the stall watchdog: %s", exc)

    def _collect(self, old: Path) -> None:
        """An earlier attempt's backstop file: to the run folder's ``stalls/`` if it holds stacks, then gone."""
        if old.stat().st_size and self.uploads_local and self.write is not None:
            try:
                log.warning("an earlier attempt ended in the C backstop (a hang holding the GIL): its stacks %s",
                            self.write(f"stalls/{old.name}", old.read_bytes()))
            except Exception as exc:  # noqa: BLE001 - kept locally for the next start
                log.warning("could not upload %s: %s", old, exc)
                return
        if old.stat().st_size == 0 or self.uploads_local:
            old.unlink()

    def _arm(self, extra_s: float = 0.0) -> None:
        if self._backstop is not None:
            faulthandler.dump_traceback_later(self.limit() + self.grace_s + CHECK_S + BACKSTOP_S + extra_s,
                                              exit=True, file=self._backstop)

    def _watch(self) -> None:
        while not self._stop.wait(min(CHECK_S, self.timeout_s / 4)):
            if self.progress != self._seen or self.waits_for_peer():
                self._seen, self.last, self.last_wall = self.progress, time.monotonic(), time.time()
                self._arm()
                continue
            if self.due(time.monotonic() - self.last):
                self._stop.set()
                self._arm(UPLOAD_S + 2 * CHECK_S)  # time for this thread's own report, the C backstop behind it
                self.stalled(time.monotonic() - self.last)

    def blocked_in(self) -> str:
        """Where the training thread waits: its innermost frame of this project's code, and the innermost
        frame of all when that is elsewhere (torch's all-reduce, a socket read)."""
        frame = sys._current_frames().get(self._thread_id)
        if frame is None:
            return "?"
        stack = traceback.extract_stack(frame)
        ours = next((f for f in reversed(stack) if f"{os.sep}orchestrator{os.sep}" in f.filename
                     and not f.filename.endswith("watchdog.py")), None)
        text = [f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})" for f in (ours, stack[-1]) if f is not None]
        return " in ".join(dict.fromkeys(text))

    def stacks(self) -> bytes:
        """Every thread's stack, as faulthandler prints them (it needs a real file), then the DataLoader workers'."""
        with tempfile.TemporaryFile() as f:
            faulthandler.dump_traceback(f, all_threads=True)
            f.seek(0)
            return f.read() + self.worker_stacks()

    def worker_stacks(self, wait_s: float = 2.0) -> bytes:
        """The stacks of this process's live DataLoader workers (``worker_stacks.register``): each is signalled and its
        file read once written: faulthandler writes a thread at a time, so once its size has stopped growing for
        0.2 s (at most ``wait_s`` in all; the stalled main thread comes last)."""
        if self._workers is None:
            return b""
        files = {int(f.stem.split("-")[1]): f for f in self._workers.glob("worker-*.txt")}
        files = {pid: f for pid, f in files.items() if _alive(pid)}
        for pid in files:
            with contextlib.suppress(OSError):
                os.kill(pid, WORKER_STACKS_SIGNAL)
        deadline, out = time.monotonic() + wait_s, b""
        for pid, f in sorted(files.items()):
            size, still = 0, 0
            while still < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
                now = f.stat().st_size
                still, size = (still + 1 if now == size and now > 0 else 0), now
            out += f"\nDataLoader worker (pid {pid}):\n".encode() + f.read_bytes()
        return out

    def stalled(self, idle_s: float) -> None:
        try:
            where = self.blocked_in()
        except Exception:  # noqa: BLE001 - the attempt ends either way
            where = "?"
        since = datetime.datetime.fromtimestamp(self.last_wall, datetime.UTC).strftime("%Y%m%dT%H%MZ")
        text = (f"rank {self.rank}, step {self.step}, no progress for {idle_s:.0f} s; training thread blocked in "
                f"{where}\n\n").encode() + self.stacks()
        saved = self._save(f"stalls/{since}/rank-{self.rank}.txt", text)
        if self.mark_stalled is not None:
            try:
                self.mark_stalled(self.step)
            except Exception:  # noqa: BLE001
                log.debug("could not mark the run stalled", exc_info=True)
        line = (f"stalled: rank {self.rank} made no progress for {idle_s:.0f} s (run.stall_timeout_s={self.timeout_s:g}) "
                f"at step {self.step}, blocked in {where}; stacks: {saved}")
        log.error("%s", line)
        time.sleep(self.grace_s)
        self.on_stall(line)

    def _save(self, name: str, text: bytes) -> str:
        """The stacks on node-local disk first, then in the run folder with a short timeout; where they are."""
        where = []
        if self.local_dir is not None:
            try:
                local = self.local_dir / name.removeprefix("stalls/")
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(text)
                where.append(str(local))
                if not self.uploads_local:
                    return str(local)  # that is the run folder
            except OSError as exc:
                where.append(f"(not written locally: {exc})")
        if self.write is not None:
            done: list[str] = []
            upload = threading.Thread(target=lambda: done.append(self.write(name, text)), daemon=True)  # type: ignore[misc]
            upload.start()
            upload.join(UPLOAD_S)
            where.append(done[0] if done else f"(not uploaded within {UPLOAD_S:g} s)")
        return ", ".join(where) or "(not written)"


def exit_process(code: int = 1) -> Callable[[str], None]:
    """``on_stall`` for a process whose launcher restarts or reports it: the line on stderr, then exit now
    (the training thread is blocked; nothing it holds can be trusted to unwind)."""

    def end(line: str) -> None:
        print(f"error: {line}; the same command resumes from the newest checkpoint", file=sys.stderr, flush=True)
        flush = threading.Thread(target=logging.shutdown, daemon=True)  # a handler on a hung stream must not block
        flush.start()
        flush.join(5)
        os._exit(code)
    return end


def for_context(ctx: Any, timeout_s: float, on_stall: Callable[[str], None]) -> Watchdog:
    """A watchdog writing through ``ctx``'s run folder (rank 0 also marks the run stalled)."""
    def write(name: str, data: bytes) -> str:
        ctx.run.write_bytes(name, data)
        return ctx.run.url_of(name)

    mark = (lambda step: ctx.run.write_status("stalled", step=step)) if ctx.is_main else None
    return Watchdog(timeout_s, ctx.rank, on_stall, write, mark, grace_s=PEER_GRACE_S if ctx.world_size > 1 else 0.0,
                    local_dir=stall_dir(ctx.run), uploads_local=not ctx.run.is_local)

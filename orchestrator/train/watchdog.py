"""The stall watchdog: a run that stops making progress without dying is ended in minutes, not hours.

Progress is a counter the loop advances with every training and evaluation micro-batch and every chunk of
a checkpoint upload (``Watchdog.tick``). A daemon thread looks at it every few seconds; when it has not
moved for ``run.stall_timeout_s`` (twice that before the first micro-batch: building, compiling, the
first reads), the thread
- writes the Python stacks of every thread of this process to ``<run>/stalls/<utc minute>/rank-<r>.txt``
  (faulthandler's dump, through the run folder; the minute is that of the last progress, so the ranks of
  one stall share a folder),
- logs one line naming this rank, the step and the function its training thread is blocked in,
- marks the run ``stalled at step N`` (rank 0; ``orchestrator.runs`` shows it until the run moves again),
- and ends the attempt through the launcher's ``on_stall``: the local launcher exits non-zero, a Ray worker
  exits (Ray Train restarts the worker group from the newest checkpoint, counted against
  ``scaling.max_failures``), a Slurm job requeues itself, as a preempted one does.

Every rank runs one. A rank stuck in its data loader stops ticking; the others then wait in the gradient
all-reduce and stop ticking too, so every rank of the attempt ends within about the timeout. The process
group's collective timeout is the same (``distributed.init_process_group``), so no rank outlives it.
"""

from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
CHECK_S = 2.0  # how often the thread looks; detection comes within timeout + CHECK_S (+ the dump's writing)
PEER_GRACE_S = 2 * CHECK_S  # with several ranks: how long the first to fire waits before ending the attempt


class Watchdog:
    """One per training process; ``start`` it where the loop begins, ``stop`` it when training ends."""

    def __init__(self, timeout_s: float, rank: int, on_stall: Callable[[str], None],
                 write: Callable[[str, bytes], str] | None = None, mark_stalled: Callable[[int], None] | None = None,
                 grace_s: float = 0.0) -> None:
        self.timeout_s, self.rank, self.on_stall = timeout_s, rank, on_stall
        # The ranks of one stall stopped ticking at about the same moment, but each thread looks on its own
        # clock: the first to fire waits this long, so that ending the attempt (a Slurm requeue, Ray tearing
        # the group down) does not kill the others before they have written their stacks.
        self.grace_s = grace_s
        self.write, self.mark_stalled = write, mark_stalled  # the run folder's writer; rank 0's status
        self.progress, self.step = 0, 0
        self.last = time.monotonic()
        self.last_wall = time.time()
        self._seen = 0
        self._thread_id = threading.get_ident()  # the training thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self, step: int | None = None) -> None:
        """Progress (cheap: called for every micro-batch and upload chunk)."""
        self.progress += 1
        if step is not None:
            self.step = step

    def start(self) -> Watchdog:
        self._thread_id = threading.get_ident()
        self.last, self.last_wall = time.monotonic(), time.time()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(CHECK_S, self.timeout_s / 4)):
            if self.progress != self._seen:
                self._seen, self.last, self.last_wall = self.progress, time.monotonic(), time.time()
                continue
            limit = self.timeout_s * (1 if self._seen else 2)
            if time.monotonic() - self.last >= limit:
                self._stop.set()
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
        """Every thread's stack, as faulthandler prints them (it needs a real file)."""
        with tempfile.TemporaryFile() as f:
            faulthandler.dump_traceback(f, all_threads=True)
            f.seek(0)
            return f.read()

    def stalled(self, idle_s: float) -> None:
        try:
            where = self.blocked_in()
        except Exception:  # noqa: BLE001 - the attempt ends either way
            where = "?"
        since = datetime.datetime.fromtimestamp(self.last_wall, datetime.UTC).strftime("%Y%m%dT%H%MZ")
        saved = "(not written)"
        if self.write is not None:
            try:
                saved = self.write(f"stalls/{since}/rank-{self.rank}.txt",
                                   f"rank {self.rank}, step {self.step}, no progress for {idle_s:.0f} s; training thread "
                                   f"blocked in {where}\n\n".encode() + self.stacks())
            except Exception as exc:  # noqa: BLE001 - the stall is reported either way
                saved = f"(not written: {exc})"
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


def exit_process(code: int = 1) -> Callable[[str], None]:
    """``on_stall`` for a process whose launcher restarts or reports it: the line on stderr, then exit now
    (the training thread is blocked; nothing it holds can be trusted to unwind)."""

    def end(line: str) -> None:
        print(f"error: {line}; the same command resumes from the newest checkpoint", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(code)
    return end


def for_context(ctx: Any, timeout_s: float, on_stall: Callable[[str], None]) -> Watchdog:
    """A watchdog writing through ``ctx``'s run folder (rank 0 also marks the run stalled)."""
    def write(name: str, data: bytes) -> str:
        ctx.run.write_bytes(name, data)
        return ctx.run.url_of(name)

    mark = (lambda step: ctx.run.write_status("stalled", step=step)) if ctx.is_main else None
    return Watchdog(timeout_s, ctx.rank, on_stall, write, mark, grace_s=PEER_GRACE_S if ctx.world_size > 1 else 0.0)

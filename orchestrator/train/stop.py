"""Graceful stops: the first SIGTERM or SIGINT asks the loop to stop at the next step, where it
checkpoints and exits; a second one stops at once.

Kubernetes, Ray node drains, spot-instance notices, Slurm's preemption (``PreemptMode=REQUEUE``
sends SIGTERM, then SIGKILL after ``GraceTime``) and Ctrl-C all arrive as SIGTERM or SIGINT.
Handlers can only be installed from a process's main thread; elsewhere (a Ray Train worker runs
the loop in a thread) the launcher relays the request instead.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from orchestrator.errors import Interrupted

log = logging.getLogger(__name__)
GRACEFUL = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Catches ``signals`` while installed; ``received`` is the first one's number, or None."""

    def __init__(self, signals: tuple[signal.Signals, ...] = GRACEFUL,
                 relay: Callable[[int], None] | None = None) -> None:
        self.signals, self.relay = signals, relay  # relay: passes the first signal on (a Ray driver to its workers)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def request(self, signum: int) -> None:
        """Record a stop request as if ``signum`` had arrived (launchers relay requests this way)."""
        if self.received is None:
            self.received = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second signal: the default action, now
            log.warning("got %s again: stopping at once", signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning("got %s: stopping at the next step to checkpoint it (a second signal stops at once)",
                    signal.Signals(signum).name)
        if self.relay is not None:
            self.relay(signum)


def interrupted(signum: int | None, step: int, checkpoint_url: str) -> Interrupted:
    """The error a launcher raises after a graceful stop: where the run resumes; exit code 128 + signal."""
    signum = signum or signal.SIGINT
    return Interrupted(f"stopped on {signal.Signals(signum).name} at step {step}, checkpointed in {checkpoint_url}; "
                       "the same command resumes there", 128 + signum)

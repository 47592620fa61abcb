"""A DataLoader worker's stacks for the stall watchdog: a rank stuck in its data loading shows only its main
thread waiting on the workers' queue; the frame where a worker is stuck is in the worker.

Each worker (``register``, from the reader's ``worker_init_fn``) opens ``<stall dir>/worker-<pid>.txt`` and has
faulthandler dump all its threads there on ``WORKER_STACKS_SIGNAL``; the training process's watchdog sends it
when the rank stalls and adds the files to its stack file. The folder comes from the watchdog through the
environment (``STALL_DIR_ENV``), which forked workers inherit.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
from pathlib import Path
from typing import IO

WORKER_STACKS_SIGNAL = signal.SIGUSR1
STALL_DIR_ENV = "INCEPTIONNEXT_STALL_DIR"
_file: IO[str] | None = None  # open for the worker's life: faulthandler writes to its descriptor


def register() -> None:
    """In a DataLoader worker: dump this process's stacks into ``<stall dir>/worker-<pid>.txt`` on the signal."""
    global _file
    folder = os.environ.get(STALL_DIR_ENV)
    if not folder:
        return
    with contextlib.suppress(OSError):
        _file = open(Path(folder) / f"worker-{os.getpid()}.txt", "w+")  # noqa: SIM115
        faulthandler.register(WORKER_STACKS_SIGNAL, file=_file, all_threads=True)
        # A worker forked from a thread that blocks signals (a Ray worker's) inherits the mask: let this one in.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {WORKER_STACKS_SIGNAL})

"""What a training checkpoint holds, as bytes: the run folder (``orchestrator.rundir``) stores them.

``state.pt`` is a weights-only ``torch.save`` of tensors and plain containers: model, EMA,
optimizer, scheduler, loop counters and the reader's position. No RNG state is needed: every
random draw is reseeded from the run seed and the position in the sample order.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from orchestrator.errors import CheckpointError
from orchestrator.rundir import STATE, RunDir
from orchestrator.storage import RetryPolicy, transient_errors, with_retries


def encode(state: dict[str, Any]) -> dict[str, bytes]:
    """The files of a checkpoint for ``state`` (``RunDir.write_checkpoint`` commits them)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return {STATE: buffer.getvalue()}


def decode(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# The host copies of the last encoded snapshot, reused by the next one: copying into memory already mapped
# costs a third of copying into fresh pages (B: 1.3 GB), at the price of keeping one staged copy between saves.
_spare: list[torch.Tensor] = []
_spare_lock = threading.Lock()


class Snapshot:
    """A checkpoint's state copied out of training (``stage``): its tensors are no longer the ones training
    updates, so encoding it (``files``: ``torch.save``, the slow part) can run off the training thread."""

    def __init__(self, state: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        self.state: dict[str, Any] | None = state
        self.tensors = tensors  # the host copies, in the order ``stage`` made them
        self._files: dict[str, bytes] | None = None

    def files(self) -> dict[str, bytes]:
        """The checkpoint's files (encoded once; the host copies then go to the next ``stage``)."""
        if self._files is None:
            assert self.state is not None
            self._files, self.state = encode(self.state), None
            with _spare_lock:
                _spare[:] = self.tensors
            self.tensors = []
        return self._files


def stage(state: dict[str, Any]) -> Snapshot:
    """Copy every tensor of ``state`` to host memory: from a GPU into pinned memory without blocking, then one
    wait for the copies; on the CPU a plain copy. The previous snapshot's copies are reused where they fit
    (once it is encoded). Containers are rebuilt; other values are immutable."""
    with _spare_lock:
        spare, _spare[:] = list(_spare), []
    made: list[torch.Tensor] = []
    from_gpu = False

    def copy(value: Any) -> Any:
        nonlocal from_gpu
        if isinstance(value, torch.Tensor):
            gpu = value.device.type == "cuda"
            from_gpu |= gpu
            reuse = spare[len(made)] if len(made) < len(spare) else None
            if reuse is None or reuse.shape != value.shape or reuse.dtype != value.dtype or reuse.is_pinned() != gpu:
                reuse = torch.empty(value.shape, dtype=value.dtype, pin_memory=gpu)
            made.append(reuse.copy_(value.detach(), non_blocking=gpu))
            return made[-1]
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(copy(v) for v in value)
        return value

    staged = copy(state)
    if from_gpu:
        torch.cuda.current_stream().synchronize()
    return Snapshot(staged, made)


class BackgroundCommitter:
    """Commits checkpoints to the run folder off the training thread: the state is staged in host memory
    (``stage``) before ``submit``; encoding and the upload run in a thread, one checkpoint at a time.

    The next ``submit`` (and ``wait``) first waits for the one in flight, so rank 0 holds at most two
    snapshots besides the live state (2.6 GB of host memory for InceptionNeXt-B). A failed upload is
    retried with backoff, then fails the run loudly at the next ``submit`` or ``wait``: never lost silently.
    """

    def __init__(self, run: RunDir, keep: int, policy: RetryPolicy | None = None,
                 progress: Callable[[], None] | None = None) -> None:
        self.run, self.keep, self.policy = run, keep, policy or RetryPolicy(attempts=4, base_delay=1.0)
        self.progress = progress  # called per uploaded chunk (the stall watchdog's progress)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        transient_errors()  # its imports happen here, not in the upload thread (see transient_errors)

    def submit(self, step: int, snapshot: Snapshot, meta: dict[str, Any]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._commit, args=(step, snapshot, meta), name=f"checkpoint-{step}",
                                        daemon=True)
        self._thread.start()

    def _commit(self, step: int, snapshot: Snapshot, meta: dict[str, Any]) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: lower this thread's priority; training first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            files = snapshot.files()
            with_retries(lambda: self.run.write_checkpoint(step, files, meta, self.progress),
                         f"checkpoint {self.run.checkpoint_url(step)}",
                         self.policy, self.run.options)
            self.run.prune(self.keep)
            self.run.write_status("running", step=step)  # here, not on the training thread (a read and a write)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = exc

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the upload in flight is committed; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"checkpoint upload to {self.run.url} failed: {error}") from error

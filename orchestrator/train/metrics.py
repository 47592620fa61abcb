"""Run outputs on rank 0: metrics.jsonl, TensorBoard events and PNG plots, in any storage, and the same
records to MLflow / Weights & Biases (``run.trackers``, ``trackers.py``).

Object stores cannot append, so files are kept locally (``~/.cache/inceptionnext/<run>``) and copied
to the run folder at each flush; on a local run folder they are written in place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.rundir import METRICS, RunDir
from orchestrator.train.curves import Plotter

if TYPE_CHECKING:
    from orchestrator.train.trackers import Trackers

log = logging.getLogger(__name__)
KEYS = ("epoch", "step", "lr", "train_loss", "images_per_sec")
NOT_CHARTED = ("epoch", "step", "time", "epochs_done", "samples_digest", "val_images")  # bookkeeping, not curves


class MetricsWriter:
    """``metrics``: the task's validation metrics, the first plotted (with its EMA) in curves.png; every
    record carries them (null where not evaluated) with the common ``KEYS``."""

    def __init__(self, run: RunDir, enabled: bool = True, metrics: tuple[str, ...] = ("top1", "top5"),
                 trackers: Callable[[Path], Trackers] | None = None, tensorboard: bool = True) -> None:
        self.run, self.enabled, self.metrics = run, enabled, metrics
        self.keys = KEYS[:4] + metrics + KEYS[4:]
        self.local = run.is_local
        self.dir = Path(run.path if self.local else tempfile.mkdtemp(prefix="inceptionnext-run-"))
        self.records: list[dict[str, Any]] = []
        self.tb = self.trackers = None
        self.closed = False
        self._lock = threading.Lock()
        self._pending: bool | None = None  # a background flush asked for (True: with plots)
        self._flusher: threading.Thread | None = None
        self.plotter = Plotter()
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records = run.records()
        (self.dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        self.trackers = trackers(self.dir) if trackers is not None else None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run re-logs them), so the file has no duplicate steps."""
        kept = [r for r in self.records if r["step"] <= step]
        if len(kept) != len(self.records) and self.enabled:
            self.records = kept
            (self.dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        full = {k: record.get(k) for k in self.keys} | record | {"time": round(time.time(), 3)}
        full = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in full.items()}
        self.records.append(full)
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(full) + "\n")
        if self.tb is not None:
            for k, v in full.items():
                if full.get("kind") != "resume" and isinstance(v, int | float) and k not in NOT_CHARTED:
                    self.tb.add_scalar(k, v, full["step"])
        if self.trackers is not None:
            self.trackers.log(full)

    def flush(self, plots: bool = False, background: bool = False) -> None:
        """Copy outputs to the run folder (object storage) and optionally redraw the plots. ``background``: in the
        writer's thread, so that an epoch end does not hold up the next step (flushes asked for meanwhile are
        merged into one; a failed one is logged and redone by the next)."""
        if not self.enabled:
            return
        if not background:
            self._wait()
            self._flush_now(plots)
            return
        with self._lock:
            self._pending = bool(self._pending) or plots
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._drain, name="metrics-flush", daemon=True)
                self._flusher.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                pending, self._pending = self._pending, None
                if pending is None:
                    self._flusher = None
                    return
            try:
                self._flush_now(pending)
            except Exception as exc:  # noqa: BLE001 - the next flush copies everything again
                log.warning("copying the run's logs to %s failed (%s); the next flush retries", self.run.url, exc)

    def _wait(self) -> None:
        flusher = self._flusher
        if flusher is not None:
            flusher.join()

    def _flush_now(self, plots: bool) -> None:
        if self.tb is not None:
            self.tb.flush()
        if plots:
            try:
                self.plotter.draw(self.dir / METRICS, self.dir / "curves.png", self.metrics[0])
            except (OSError, RuntimeError) as exc:  # curves.png is a view; TensorBoard and the trackers have the curves
                log.warning("curves.png not redrawn: %s", exc)
        if not self.local:
            for file in self.dir.rglob("*"):
                if file.is_file():
                    self.run.put_file(str(file), str(file.relative_to(self.dir)))

    def close(self, state: str = "finished", artifacts: dict[str, bytes] | None = None) -> None:
        """The last flush and plots; the trackers get ``curves.png`` and ``artifacts`` and end as ``state``
        (finished, stopped, failed). Only the first call counts."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        self.flush(plots=state != "failed")
        self.plotter.close()
        if self.tb is not None:
            self.tb.close()
        if self.trackers is not None:
            curves = self.dir / "curves.png"
            files = {"curves.png": curves.read_bytes()} if curves.exists() else {}
            self.trackers.finish(state, files | (artifacts or {}))


def interactive() -> bool:
    """Progress bars only on a terminal; plain log lines in jobs."""
    return os.isatty(2)

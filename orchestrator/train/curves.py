"""``curves.png`` (loss, the task's metric and its EMA, learning rate) from ``metrics.jsonl``, drawn by a helper
process of its own: matplotlib's work at every epoch end would otherwise take the training process's GIL and
cores from the next steps (``bench/train_step.py``: 4 steps of delay per epoch end from a drawing thread, 1 with
the helper).

    python -m orchestrator.train.curves     # the helper: one JSON request per line on stdin, "ok" per drawing
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def records(jsonl: Path) -> list[dict[str, Any]]:
    """The records of a local ``metrics.jsonl``; a line being written (torn) is left out."""
    out = []
    for line in jsonl.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def draw(jsonl: Path, png: Path, metric: str) -> None:
    from matplotlib.figure import Figure

    found = records(jsonl)
    fig = Figure(figsize=(15, 4))
    for ax, key in zip(fig.subplots(1, 3), ("train_loss", metric, "lr"), strict=True):
        points = [(r["step"], r[key]) for r in found if r.get(key) is not None]
        if key == metric:
            ema = [(r["step"], r[f"ema_{key}"]) for r in found if r.get(f"ema_{key}") is not None]
            if ema:
                ax.plot(*zip(*ema, strict=True), marker=".", label=f"EMA {key}")
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if key == metric else None, label=key)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


class Plotter:
    """The helper process, started at the first drawing (niced) and ended by ``close`` (an empty line) or by its
    parent's exit (its stdin closes). ``draw`` waits for the drawing; the metrics writer calls it from its own thread."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def draw(self, jsonl: Path, png: Path, metric: str) -> None:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, text=True)
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, self._proc.pid, 10)
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(json.dumps({"jsonl": str(jsonl), "png": str(png), "metric": metric}) + "\n")
            self._proc.stdin.flush()
            reply = self._proc.stdout.readline().strip()
        if reply != "ok":
            raise RuntimeError(f"drawing {png}: {reply or 'the helper exited'}")

    def close(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None:
                with contextlib.suppress(OSError):  # an empty line ends it: processes forked since (DataLoader
                    self._proc.stdin.write("\n")  # workers) hold the pipe too, so closing it is no end of input
                    self._proc.stdin.flush()
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
            self._proc = None


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            break
        try:
            request = json.loads(line)
            draw(Path(request["jsonl"]), Path(request["png"]), request["metric"])
            print("ok", flush=True)
        except Exception as exc:  # noqa: BLE001 - the writer logs it; the next epoch end tries again
            print(f"error: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()

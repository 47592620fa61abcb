"""Shared fixtures: a small generated dataset and recipe helpers. Service fixtures live in tests/services.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import recipe as recipes
from orchestrator.data.shard_writer import WriteOptions, write_dataset
from orchestrator.data.synth import SynthSegSource, SynthSource
from orchestrator.rundir import RunDir
from orchestrator.train.context import TrainContext
from tests.services import poll

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.services", "tests.slurm"]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes, 320 train / 80 val images of 32 px, in several shards of 16-row groups."""
    dest = tmp_path_factory.mktemp("synth")
    write_dataset(SynthSource(classes=10, train=320, val=80, size=32), str(dest),
                  WriteOptions(shard_size_mb=0.08, rows_per_group=16, seed=0))
    return dest


def smoke_sets(tmp_path: Path, data: Path) -> list[str]:
    """The ``--set`` pairs that make the shipped smoke recipe tiny and fast on the test dataset, its runs under ``tmp_path``."""
    return [f"data.train={data}/train", f"data.val={data}/val", "data.input_size=32", "data.num_workers=0",
            "data.shuffle_buffer=64", "batch.global_batch_size=32", "batch.per_device_max=32", "schedule.epochs=2",
            f"run.storage={tmp_path}/runs", "run.log_every_steps=2"]


def smoke_recipe(tmp_path: Path, data: Path, *overrides: str) -> recipes.Recipe:
    """The shipped smoke recipe on the test dataset (``smoke_sets``)."""
    return recipes.load(ROOT / "recipes" / "smoke.yaml", [*smoke_sets(tmp_path, data), *overrides])


@pytest.fixture(scope="session")
def seg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated segmentation set (4 shapes + background, 64x48 images, ADE20K's label convention):
    192 train / 30 val images in 16-row groups."""
    dest = tmp_path_factory.mktemp("synth_seg")
    write_dataset(SynthSegSource(shapes=4, train=192, val=30, size=64), str(dest),
                  WriteOptions(shard_size_mb=0.1, rows_per_group=16, seed=0))
    return dest


def seg_recipe(tmp_path: Path, data: Path, *overrides: str) -> recipes.Recipe:
    """The shipped segmentation smoke recipe on the test set, with a run folder under ``tmp_path``."""
    return recipes.load(ROOT / "recipes" / "seg" / "smoke.yaml", [
        f"data.train={data}/train", f"data.val={data}/val", "data.num_workers=0", "data.shuffle_buffer=32",
        "schedule.iterations=24", "schedule.warmup_iterations=4", "run.eval_every_steps=null", "run.log_every_steps=4",
        "segment.aug_test=false", f"run.storage={tmp_path}/runs", *overrides,
    ])


def seg_tiny(seg_dir: Path, stage: str = "upernet") -> list[str]:
    """The segmentation stage on the test set: a few iterations, evaluated once at the end."""
    return [f"--set={stage}:{kv}" for kv in (f"data.train={seg_dir}/train", f"data.val={seg_dir}/val",
                                              "data.num_workers=0", "schedule.iterations=4", "schedule.warmup_iterations=0",
                                              "run.eval_every_steps=null", "segment.aug_test=false", "optimizer.lr=1e-7")]


def assert_backbone_from(seg_run: Path, pretrain_run: Path) -> None:
    """The segmentation stage started from the pretraining stage's weights (4 steps at lr 1e-7 move a weight by
    ~1e-6; a fresh initialisation differs by ~1e-1) and evaluated its validation set."""
    pretrained, segmented = load_file(pretrain_run / "model.safetensors"), load_file(seg_run / "model.safetensors")
    conv = "stages.2.blocks.0.token_mixer.dwconv_hw.weight"
    torch.testing.assert_close(segmented[f"backbone.{conv}"], pretrained[conv], atol=1e-4, rtol=0)
    last = RunDir(str(seg_run)).last_record()
    assert last["step"] == 4 and last["val_images"] == 30 and 0 <= last["mIoU"] <= 100
    assert (seg_run / "per_class_iou.csv").exists()


def signal_after_step(command: list[str], run: Path, step: int, timeout: float, sig: int = signal.SIGTERM,
                      group: bool = False, **popen: Any) -> tuple[int, int, str]:
    """Start ``command``, send it ``sig`` once ``run`` has logged a training step >= ``step``; returns its exit
    code, the step it says it stopped at, and its stderr. ``group``: signal its whole process group,
    DataLoader workers (and a local Ray cluster) included, as Slurm and a terminal's Ctrl-C do."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=group, **popen)
    try:
        poll(lambda: any(r.get("kind") == "train" and r["step"] >= step for r in RunDir(str(run)).records()), timeout,
             f"training to pass step {step}")
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    stopped = re.search(rf"stopped on {signal.Signals(sig).name} at step (\d+)", err)
    return proc.returncode, int(stopped.group(1)) if stopped else -1, err


def assert_stopped_at(run: Path, step: int, sig: str) -> None:
    """What a graceful stop leaves: the stop step checkpointed, a ``stop`` record naming the signal, status stopped."""
    assert steps_of(run)[-1] == step and not (run / "model.safetensors").exists()
    (stop,) = [r for r in RunDir(str(run)).records() if r["kind"] == "stop"]
    assert (stop["step"], stop["reason"]) == (step, sig)
    assert RunDir(str(run)).status()["state"] == "stopped"


def steps_of(run: Path) -> list[int]:
    """Steps of the committed checkpoints of the run folder ``run``, oldest first."""
    return [c.step for c in RunDir(str(run)).committed()]


class StopAfter(TrainContext):
    """Asks the loop to stop after ``steps`` steps, as a preempted Slurm job does."""

    def __init__(self, steps: int, run: Path) -> None:
        super().__init__(run=RunDir(str(run)))
        self.calls, self.steps = 0, steps

    def stop_requested(self) -> bool:
        self.calls += 1
        return self.calls == self.steps

"""No compute lost: Ctrl-C to a Ray driver, and runs moved between Ray,
the local launcher and Slurm with pruning on. Each test proves where the run resumed (its ``resume``
records) and that it ends with the weights of an uninterrupted run. A torn upload and a Ray worker's SIGTERM
are faults of the chaos run (test_many_nodes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import pretrain
from orchestrator.launch.slurm import submit
from orchestrator.launch.slurm_cluster import job_states
from orchestrator.recipe import Recipe, absolute_paths, load, with_values
from orchestrator.rundir import RunDir
from orchestrator.slurm_options import SlurmOptions
from tests.conftest import ROOT, assert_stopped_at, signal_after_step, smoke_recipe
from tests.services import RayCluster, poll
from tests.slurm import SlurmCluster

pytestmark = pytest.mark.timeout(400)
# Checkpoints every 2 steps, only the newest kept: a launcher that needed an older one would fail.
PRUNED = ("run.checkpoint_every_steps=2", "run.keep_checkpoints=1", "schedule.epochs=1", "scaling.cpus_per_worker=2")


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def resumes(run: Path) -> list[tuple[int, str]]:
    return [(r["step"], r["launcher"]) for r in RunDir(str(run)).records() if r["kind"] == "resume"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def sets(data: Path, storage: Path, run_name: str) -> list[str]:
    """``smoke_recipe``'s settings with PRUNED, as --set arguments for the command line."""
    return [f"data.train={data}/train", f"data.val={data}/val", "data.input_size=32", "data.num_workers=0",
            "data.shuffle_buffer=64", "batch.global_batch_size=32", "batch.per_device_max=32", "run.log_every_steps=2",
            f"run.storage={storage}", f"run.name={run_name}", *PRUNED]


@pytest.fixture(scope="module")
def reference(ray_cluster: RayCluster, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run under Ray, as a user starts it, that the others must end equal to."""
    storage = tmp_path_factory.mktemp("reference")
    command = [sys.executable, "-m", "orchestrator.pretrain", "recipes/smoke.yaml", "--set",
               *sets(synth_dir, storage, "reference")]
    done = subprocess.run(command, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return storage / "reference"


def test_ctrl_c_to_a_ray_driver_checkpoints_and_the_rerun_is_exact(ray_cluster: RayCluster, synth_dir: Path,
                                                                   tmp_path: Path) -> None:
    """SIGINT to the driver's process group, as a terminal's Ctrl-C sends it (Ray Train's own SIGINT handler would
    abort the run without a checkpoint; SIGTERM takes the same path as SIGINT from there). Epochs of 20 steps, so
    that the stop (the workers ask the driver's relay once a second; a loaded CI machine has taken 8 steps) lands
    inside one. Scheduled checkpoints off: the one at the step it stopped at can only be the stop's."""
    run_name = name("term")
    settings = [*sets(synth_dir, tmp_path / "runs", run_name), "batch.global_batch_size=16", "batch.per_device_max=16",
                "schedule.epochs=2", "run.checkpoint_every_steps=null"]
    command = [sys.executable, "-m", "orchestrator.pretrain", "recipes/smoke.yaml", "--set", *settings]
    run = tmp_path / "runs" / run_name
    code, stopped, err = signal_after_step(command, run, 2, 180, signal.SIGINT, group=True, cwd=ROOT,
                                           env=ray_cluster.env)
    assert code == 130, err[-3000:]
    assert 2 <= stopped < 40 and stopped % 20  # not at an epoch end
    assert_stopped_at(run, stopped, "SIGINT")

    done = subprocess.run(command, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumes(run) == [(stopped, "ray")]
    # The uninterrupted run; the round trips below show local and Ray runs end bitwise equal.
    pretrain.train(load(ROOT / "recipes" / "smoke.yaml", [*sets(synth_dir, tmp_path / "runs", "straight"), *settings[-4:]]))
    assert_same_weights(run, tmp_path / "runs" / "straight")


def segment(recipe: Recipe, steps: int) -> Recipe:
    return with_values(recipe, {"run.max_steps": steps})


def test_ray_local_slurm_ray_round_trip_with_pruning(reference: Path, driver: RayCluster, slurm_cluster: SlurmCluster,
                                                     synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One run moved Ray -> local -> Slurm -> Ray, only its newest checkpoint kept: each launcher resumes where the
    last stopped, and the run ends with the uninterrupted Ray run's weights."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    recipe = absolute_paths(smoke_recipe(tmp_path, synth_dir, *PRUNED, f"run.name={name('trip')}"))
    pretrain.train(segment(recipe, 4), "ray")
    pretrain.train(segment(recipe, 6))
    job = submit(pretrain.training(segment(recipe, 8)), SlurmOptions(time="00:05:00", log_dir=str(tmp_path / "logs"))).job_id
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    assert poll(lambda: (s := job_states([job])[0].get(job)) in final and s, 240, f"Slurm job {job}") == "COMPLETED"
    pretrain.train(recipe, "ray")
    run = tmp_path / "runs" / recipe.run.name
    assert resumes(run) == [(4, "local"), (6, "slurm"), (8, "ray")]
    assert_same_weights(run, reference)

"""Two Ray nodes on this machine: the session's head (2 CPUs) and a second node (2 CPUs) joined to it with
``ray start --address`` (its own processes, stopped by PID)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.launch import local, ray_train
from orchestrator.rundir import RunDir
from tests.conftest import smoke_recipe
from tests.integration.test_ray import assert_same_gradients, ddp_gradients
from tests.integration.test_world_sizes import digests, parameter_distance
from tests.services import RayCluster, RayWorkerNode, poll

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def second_node(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayWorkerNode]:
    node = RayWorkerNode(ray_cluster, tmp_path_factory.mktemp("ray-node") / "ray-start.log", num_cpus=2)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_ddp_across_two_nodes_gives_the_single_worker_gradients(second_node: RayWorkerNode, driver: RayCluster,
                                                                 synth_dir: Path, tmp_path: Path) -> None:
    """STRICT_SPREAD puts one worker on each node; gloo all-reduces across them."""
    grads, nodes = ddp_gradients(synth_dir, tmp_path, placement="STRICT_SPREAD")
    assert len(nodes) == 2
    assert_same_gradients(grads)


def test_an_elastic_run_loses_a_node_keeps_training_and_grows_back(second_node: RayWorkerNode, driver: RayCluster,
                                                                   synth_dir: Path, tmp_path: Path) -> None:
    """``scaling.num_workers=[1, 2]`` with 2 CPUs per worker: one worker per node. The second node's raylet
    is SIGKILLed mid-epoch; the run goes on with one worker from the newest checkpoint, and with two again once
    the node is back. Every step is logged once, with the samples of an uninterrupted one-process run."""
    name = f"elastic-{uuid.uuid4().hex[:6]}"
    common = ("batch.per_device_max=16", "schedule.epochs=14", "run.log_every_steps=1", "run.checkpoint_every_steps=2",
              "data.input_size=48")
    recipe = smoke_recipe(tmp_path, synth_dir, *common, f"run.name={name}", "scaling.num_workers=[1, 2]",
                          "scaling.cpus_per_worker=2", "scaling.resize_check_s=1", "scaling.max_failures=10")
    run = tmp_path / "runs" / name
    done: list[Any] = []
    fit = threading.Thread(target=lambda: done.append(_result(lambda: ray_train.run(recipe))), daemon=True)
    fit.start()

    def trained_on(world: int, after: int = 0) -> bool:
        status = RunDir(str(run)).status()
        return status.get("world_size") == world and status.get("step", 0) > after

    poll(lambda: trained_on(2, 2), 240, "two workers passing step 2")
    second_node.kill_raylet()
    poll(lambda: bool(done) or any(r["kind"] == "resume" and r["world_size"] == 1 for r in RunDir(str(run)).records()),
         240, "a restart on one worker")
    shrunk_at = next(r["step"] for r in RunDir(str(run)).records() if r["kind"] == "resume" and r["world_size"] == 1)
    second_node.start()
    fit.join(timeout=420)
    assert done and not isinstance(done[0], BaseException), done
    resumes = [(r["step"], r["world_size"], r["saved_on_world_size"]) for r in RunDir(str(run)).records()
               if r["kind"] == "resume"]
    assert resumes[0] == (shrunk_at, 1, 2) and resumes[-1][1:] == (2, 1) and resumes[-1][0] > shrunk_at, resumes

    straight = smoke_recipe(tmp_path, synth_dir, *common, "run.name=straight")
    local.run(straight)
    assert digests(run) == digests(tmp_path / "runs" / "straight")  # every step once, with the same samples
    assert parameter_distance(run, tmp_path / "runs" / "straight") < 5e-3


def _result(fn: Any) -> Any:
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        return exc

"""Two Ray nodes on this machine: the session's head (2 CPUs) and a second node joined to it with
``ray start --address`` (its own processes, stopped by PID)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_ray import assert_same_gradients, ddp_gradients
from tests.services import RayCluster, RayWorkerNode

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def second_node(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayWorkerNode]:
    node = RayWorkerNode(ray_cluster, tmp_path_factory.mktemp("ray-node") / "ray-start.log")
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

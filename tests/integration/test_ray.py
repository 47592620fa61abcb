"""Ray launcher pieces that need no running cluster. Cluster tests (job submit, DDP, faults) are in progress."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT


def test_cluster_yaml_passes_rays_own_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("p")
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])

"""deploy/kuberay: every manifest parses; its fields are KubeRay's (RayCluster, RayJob: tests/data/
kuberay_v1_fields.yaml) and Kubernetes' own (the pod templates the CRDs embed, against the kubernetes client's
models); each RayJob runs the cluster of raycluster.yaml with an entrypoint whose module, recipe and arguments
this project accepts (``--print-config``), and whose recipe's workers that cluster holds; token
authentication on, the head closed to the network and no secret written in."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.version import Version

from tests.conftest import ROOT

FIELDS = yaml.safe_load((ROOT / "tests" / "data" / "kuberay_v1_fields.yaml").read_text())
MANIFESTS = sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)


def unknown_fields(value: Any, kind: Any, where: str) -> list[str]:
    """The paths of fields in ``value`` that type ``kind`` (of FIELDS, or a Kubernetes model) does not have."""
    if kind in ("str", "int", "float", "bool", "any"):
        return []
    if kind == "map":
        return [] if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()) else [f"{where}: not a map of strings"]
    if isinstance(kind, list):
        return [e for i, item in enumerate(value) for e in unknown_fields(item, kind[0], f"{where}[{i}]")]
    if isinstance(kind, str) and kind.startswith("k8s:"):
        return kubernetes_unknown(value, kind[4:], where)
    fields = FIELDS[kind] if isinstance(kind, str) else kind
    if not isinstance(value, dict):
        return [f"{where}: not an object"]
    return [f"{where}.{k}" for k in value if k not in fields] + [
        e for k, v in value.items() if k in fields for e in unknown_fields(v, fields[k], f"{where}.{k}")]


def kubernetes_unknown(value: Any, model: str, where: str) -> list[str]:
    import kubernetes.client

    if not isinstance(value, dict):
        return [f"{where}: not an object"]
    cls = getattr(kubernetes.client, model)
    by_name = {name: attr for attr, name in cls.attribute_map.items()}
    out = []
    for key, v in value.items():
        if key not in by_name:
            out.append(f"{where}.{key}")
            continue
        kind = cls.openapi_types[by_name[key]]
        listed = re.fullmatch(r"[Ll]ist\[(\w+)\]", kind)
        if listed and listed.group(1)[0].isupper() and listed.group(1) not in ("str", "object"):
            out += [e for i, item in enumerate(v) for e in kubernetes_unknown(item, listed.group(1), f"{where}.{key}[{i}]")]
        elif re.fullmatch(r"(V\d\w*|Core\w+)", kind):
            out += kubernetes_unknown(v, kind, f"{where}.{key}")
    return out


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_field_check_catches_a_misspelt_field_at_every_level() -> None:
    template = {"spec": {"containers": [{"name": "w", "image": "i", "resource": {}}]}}
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": {
        "authOption": {}, "headGroupSpec": {"rayStartParams": {}, "template": template},
        "workerGroupSpecs": [{"groupName": "g", "replica": 1}]}}
    assert unknown_fields(cluster, "RayCluster", "RayCluster") == [
        "RayCluster.spec.authOption", "RayCluster.spec.headGroupSpec.template.spec.containers[0].resource",
        "RayCluster.spec.workerGroupSpecs[0].replica"]


@pytest.mark.parametrize("name", [p.name for p in MANIFESTS])
def test_a_manifest_has_only_kuberay_and_kubernetes_fields(name: str) -> None:
    found = [doc for file, doc in documents() if file == name]
    assert found, f"{name}: no document"
    for doc in found:
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1"
            assert unknown_fields(doc, doc["kind"], f"{name}: {doc['kind']}") == []
        else:
            assert kubernetes_unknown(doc, f"V1{doc['kind']}", f"{name}: {doc['kind']}") == []


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_rayjob_runs_this_projects_recipe_on_a_cluster_that_holds_its_workers(
        capsys: pytest.CaptureFixture[str]) -> None:
    docs = documents()
    (cluster,) = [doc["spec"] for _, doc in docs if doc["kind"] == "RayCluster"]
    jobs = [(name, doc["spec"]) for name, doc in docs if doc["kind"] == "RayJob"]
    assert {name for name, _ in jobs} == {"rayjob-b.yaml", "rayjob-pipeline-b.yaml"}
    for name, job in jobs:
        assert job["rayClusterSpec"] == cluster, f"{name}: not the cluster of raycluster.yaml"
        python, flag, module, *args = shlex.split(job["entrypoint"])
        assert (python, flag) == ("python", "-m") and importlib.util.find_spec(module) is not None, name
        args = [a.replace("/app/", f"{ROOT}/") for a in args]  # the image's /app is this checkout (Dockerfile)
        assert Path(args[0]).exists(), f"{name}: {args[0]}"
        assert importlib.import_module(module).main([*args, "--print-config"]) == 0, capsys.readouterr().err
        printed = json.loads(capsys.readouterr().out)
        for recipe in [printed] if "scaling" in printed else printed.values():  # a pipeline: one per stage
            s = recipe["scaling"]
            workers = max(s["num_workers"]) if isinstance(s["num_workers"], list) else s["num_workers"]
            (group,) = cluster["workerGroupSpecs"]
            (worker,) = group["template"]["spec"]["containers"]
            gpus, cpus = int(worker["resources"]["limits"]["nvidia.com/gpu"]), float(worker["resources"]["requests"]["cpu"])
            assert group["replicas"] * gpus == workers * s["gpus_per_worker"], f"{name}: {workers} workers"
            assert cpus >= gpus // s["gpus_per_worker"] * s["cpus_per_worker"], f"{name}: {cpus} CPUs a pod"
            assert recipe["data"]["train"].startswith("s3://") and recipe["run"]["storage"].startswith("s3://")


def test_the_clusters_are_locked_and_hold_no_secret() -> None:
    for name, doc in documents():
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec") if doc["kind"] == "RayJob" else None
        if spec is None:
            continue
        assert spec["authOptions"] == {"mode": "token"} and Version(spec["rayVersion"]) >= Version("2.52"), name  # Ray token auth
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0", name
        for container in containers(spec):
            for env in container.get("env", []):
                assert not (SECRET_NAME.search(env["name"]) and "value" in env), f"{name}: {env['name']} written in"
            assert all(set(source) <= {"secretRef", "configMapRef"} for source in container.get("envFrom", []))

"""``orchestrator.doctor`` in this process: the figures, the plan, the verdicts and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from orchestrator import doctor
from tests.conftest import ROOT, smoke_recipe


def sets(tmp_path: Path, data: Path) -> list[str]:
    return ["--set", f"data.train={data}/train", f"data.val={data}/val", "data.input_size=32", "data.num_workers=0",
            "batch.global_batch_size=32", "batch.per_device_max=32", f"run.storage={tmp_path}/runs"]


def test_the_doctor_measures_this_process_and_plans_the_recipe(synth_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(ROOT / "recipes" / "smoke.yaml"), "--launcher", "local", "--nodes", "2,3", "--seconds", "1",
            *sets(tmp_path, synth_dir)]
    assert doctor.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (probe,) = report["probes"]
    assert probe["devices"]["name"] == "cpu" and probe["devices"]["cpu_cores"] >= 1
    assert probe["read"]["mb_per_s"] > 0 and probe["read"]["images"] > 0 and probe["write"]["mb_per_s"] > 0
    assert probe["input"]["images_per_cpu_s"] > 0 and probe["compute"]["images_per_s"] > 0
    here = report["plan"]["this_cluster"]
    assert here["step_s"] == max(here["seconds"].values()) > 0 and here["bound"] in doctor.BOUNDS
    assert here["epoch_s"] == pytest.approx(here["step_s"] * report["plan"]["steps_per_epoch"])
    assert report["plan"]["larger"]["2"]["world_size"] == 2 and "error" in report["plan"]["larger"]["3"]
    # The verdict names the key the plan line names (the micro-batch does not split over 3), not data.partitions.
    (three,) = [v for v in report["verdicts"] if v.startswith("--nodes 3:")]
    assert "batch.per_device_max=32" in three and "world size 3 does not divide" in three and "partitions" not in three
    saved = list((tmp_path / "runs").glob("doctor-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["plan"] == report["plan"]
    assert not list((tmp_path / "runs").glob(".doctor-*"))  # the write probe's object is gone
    text = doctor.table(smoke_recipe(tmp_path, synth_dir), report)  # what is printed without --json
    assert "plan on this cluster (1 devices" in text and "verdict: --nodes 3" in text
    assert text.splitlines()[1].split()[:2] == [probe["node"][:14], "1"]


def test_the_verdicts_name_the_key_to_change(synth_dir: Path, tmp_path: Path) -> None:
    """From figures of a GPU node that is short of CPU and memory (made up here: what a GPU would measure)."""
    recipe = smoke_recipe(tmp_path, synth_dir, "batch.global_batch_size=256", "batch.per_device_max=128",
                          "data.partitions=8")
    node = {"rank": 0, "node": "n1", "allreduce": {},
            "devices": {"name": "H100", "memory_gb": 80, "cores_per_device": 4.0, "cpu_cores": 8, "devices_on_node": 2,
                        "torch": "2.14"},
            "read": {"mb_per_s": 2000.0, "images_per_s": 20000.0}, "write": {"mb_per_s": 500.0, "bytes": 4e6},
            "input": {"images_per_cpu_s": 250.0},
            "compute": {"micro_batch": 128, "images_per_s": 3000.0, "peak_gb": 70.0, "max_micro_batch": 96,
                        "memory_gb": 80}}
    others = [copy.deepcopy(node) | {"rank": 1}]
    for o in others:
        del o["input"], o["read"]
    probes = [node, *others]
    planned = doctor.plan(recipe, probes, [])
    assert planned["this_cluster"]["bound"] == "input"
    lines = doctor.verdicts(recipe, probes, planned)
    assert any(v.startswith("input-bound: 12.0 cores per device needed, 4.0 available: set data.decode: gpu") for v in lines), lines
    assert "micro-batch 128 does not fit in 80 GB: set batch.per_device_max: 96" in lines


def test_bad_input_is_refused_before_anything_runs(synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = str(ROOT / "recipes" / "smoke.yaml")
    unreachable = ["--set", f"data.train={synth_dir}/train", f"data.val={synth_dir}/val",
                   "run.storage=s3://runs", "run.storage_options={endpoint_url: http://127.0.0.1:9, key: k, secret: s}"]
    assert doctor.main([recipe, "--launcher", "local", *unreachable]) == 2
    assert "run.storage=s3://runs: cannot connect" in capsys.readouterr().err
    assert doctor.main([recipe, "--launcher", "local", "--nodes", "eight", *sets(tmp_path, synth_dir)]) == 2
    assert "--nodes 'eight'" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # not a Slurm login node
    assert doctor.main([recipe, "--launcher", "slurm", "--gpus-per-node", "0", *sets(tmp_path, synth_dir)]) == 2
    assert "--launcher slurm: sbatch is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

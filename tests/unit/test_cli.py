"""Every entry point shares one error path: one line, the right exit code, no secret, nothing written.

The unreachable store is a loopback port nobody listens on, with fake credentials that must never
be printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import cli, overrides, storage
from orchestrator.data.__main__ import main as data_main
from orchestrator.errors import RecipeError, TrainingError
from orchestrator.finetune import main as finetune_main
from orchestrator.gradcam.__main__ import main as gradcam_main
from orchestrator.pipeline.command import main as pipeline_main
from orchestrator.pretrain import main as pretrain_main
from orchestrator.rundir import RunDir
from orchestrator.runs import main as runs_main
from orchestrator.tune import main as tune_main
from tests.conftest import ROOT
from tests.services import free_port

SECRET = "fake-secret-Zq8w7v6u5t"
R = ROOT / "recipes"


@pytest.fixture(scope="module")
def dead_store() -> dict[str, str]:
    """Options for an S3 endpoint where nothing listens, with fake credentials."""
    return {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "AKIAFAKEFAKE", "secret": SECRET}


def flow(options: dict[str, str]) -> str:
    return json.dumps(options)


def run(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(err: str, code: int, expected_code: int, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and line.split(" ", 1)[0].count(":") != 2]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    assert SECRET not in err


CASES = {
    # name: (main, argv builder, exit code, words in the message)
    "pretrain bad key": (pretrain_main, lambda t, s: [str(R / "smoke.yaml"), "--set", "optimizer.lrr=1"], 2,
                         ["--set: optimizer.lrr: unknown key"]),
    "pretrain dead store": (pretrain_main, lambda t, s: [str(R / "smoke.yaml"), "--launcher", "local", "--set",
                                                         "run.storage=s3://runs", f"run.storage_options={flow(s)}",
                                                         "data.train=/nowhere/train"], 2,
                            ["run.storage=s3://runs", "cannot connect to http://127.0.0.1:", "endpoint_url in run.storage_options"]),
    "pretrain missing data": (pretrain_main, lambda t, s: [str(R / "smoke.yaml"), "--launcher", "local", "--set",
                                                           f"data.train={t}/nowhere", f"run.storage={t}/runs"], 2,
                              [f"data.train={'{t}'}/nowhere", "no manifest.json"]),
    "finetune without init": (finetune_main, lambda t, s: [str(R / "smoke.yaml"), "--launcher", "local", "--set",
                                                           f"run.storage={t}/runs", "data.train=/d"], 2,
                              ["model.init: fine-tuning needs a run name"]),
    "pipeline bad stage key": (pipeline_main, lambda t, s: [str(R / "pipelines" / "smoke.yaml"), "--launcher", "local",
                                                            "--set", "pretrain:optimizer.lrr=1"], 2,
                               ["optimizer.lrr: unknown key"]),
    "pipeline dead store": (pipeline_main, lambda t, s: [str(R / "pipelines" / "smoke.yaml"), "--launcher", "local",
                                                         "--storage", "s3://runs", "--set",
                                                         f"run.storage_options={flow(s)}", f"data.train={t}/d"], 2,
                            ["storage=s3://runs", "cannot connect"]),
    "pipeline missing file": (pipeline_main, lambda t, s: [f"{t}/nope.yaml", "--status"], 2,
                              ["nope.yaml: pipeline file not found"]),
    "tune bad sweep field": (tune_main, lambda t, s: [str(R / "sweeps" / "smoke.yaml"), "--set", "sweep.colour=red"], 2,
                             ["unknown key(s) ['colour']"]),
    "tune dead store": (tune_main, lambda t, s: [str(R / "sweeps" / "smoke.yaml"), "--set", "run.storage=s3://runs",
                                                 f"run.storage_options={flow(s)}", "data.train=/d", "data.val=/v"], 2,
                        ["cannot connect"]),
    "gradcam dead store": (gradcam_main, lambda t, s: ["--model", "A=s3://runs/a", "--images", "s3://data/val", "--out",
                                                       f"{t}/fig.png", "--storage-option",
                                                       *(f"{k}={v}" for k, v in s.items())], 2,
                           ["--images=s3://data/val", "cannot connect"]),
    "gradcam missing file": (gradcam_main, lambda t, s: ["--model", f"A={t}/nothing", "--images", f"{t}/none", "--out",
                                                         f"{t}/fig.png"], 2, ["none"]),
    "data dead store": (data_main, lambda t, s: ["synth", "s3://data/synth", "--storage-option",
                                                 *(f"{k}={v}" for k, v in s.items())], 2,
                        ["DEST=s3://data/synth", "cannot connect"]),
    "data missing source": (data_main, lambda t, s: ["shard", f"{t}/no-such-folder", f"{t}/out"], 2,
                            ["no-such-folder"]),
    "runs dead store": (runs_main, lambda t, s: ["s3://runs", "--storage-option", *(f"{k}={v}" for k, v in s.items())],
                        2, ["STORAGE=s3://runs", "cannot connect"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_entry_point_fails_in_one_line_without_secrets_or_writes(case: str, tmp_path: Path,
                                                                       dead_store: dict[str, str],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    main, argv, expected, words = CASES[case]
    before = set(os.listdir(tmp_path))
    code, out, err = run(main, argv(tmp_path, dead_store), capsys)
    assert_one_line(err, code, expected, *(w.replace("{t}", str(tmp_path)) for w in words))
    assert SECRET not in out
    assert set(os.listdir(tmp_path)) == before, "nothing may be written when the input is bad"


def test_no_credentials_and_a_missing_bucket_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       dead_store: dict[str, str]) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(storage.StorageError) as err:
        storage.check_reachable("s3://runs", {"endpoint_url": dead_store["endpoint_url"]}, "run.storage",
                                "run.storage_options")
    assert "no credentials for the store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(err.value)


def test_set_takes_several_pairs_or_repeats_and_the_value_is_yaml() -> None:
    p = cli.parser("x", None)
    cli.add_set(p)
    args = p.parse_args(["--set", "a.b=1", "c.d=[1, 2]", "--set", "e.f={k: v}", "--set=s:g.h=null"])
    parsed = overrides.parse(args.set)
    assert [(o.key, o.value, o.scope) for o in parsed] == [("a.b", 1, None), ("c.d", [1, 2], None),
                                                           ("e.f", {"k": "v"}, None), ("g.h", None, "s")]
    with pytest.raises(RecipeError, match="expected section.key=value"):
        overrides.parse(["optimizer=1"])


def test_secrets_from_the_environment_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret-9a8b7c")
    assert storage.redact("failed with envsecret-9a8b7c in the URL") == "failed with *** in the URL"


def test_an_unexpected_error_exits_1_with_its_traceback_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    storage.remember_secrets({"secret": SECRET})

    def body(_args: object) -> None:
        raise ValueError(f"boom {SECRET}")

    assert cli.run(body, cli.parser("x", None), []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: boom ***") and SECRET not in err


def test_ctrl_c_exits_130(capsys: pytest.CaptureFixture[str]) -> None:
    def body(_args: object) -> None:
        raise KeyboardInterrupt

    assert cli.run(body, cli.parser("x", None), []) == 130
    assert "interrupted" in capsys.readouterr().err


def test_an_interruption_keeps_its_exit_code_across_processes() -> None:
    """Ray pickles a worker's error to the driver, which exits with the code it carries."""
    import pickle

    from orchestrator.train.stop import interrupted

    back = pickle.loads(pickle.dumps(interrupted(15, 7, "runs/x")))
    assert back.exit_code == 143 and str(back).startswith("stopped on SIGTERM at step 7")


def test_status_and_the_run_listing_import_neither_torch_nor_submitit() -> None:
    code = ("import sys, orchestrator.pipeline.command, orchestrator.runs; "
            "print(sorted(m for m in ('torch', 'submitit', 'ray', 'orchestrator.train.loop') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_runs_lists_finished_and_stopped_runs(synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    from orchestrator import pretrain
    from orchestrator.train.context import StopRequested
    from orchestrator.train.loop import train
    from tests.conftest import StopAfter, smoke_recipe, smoke_sets

    pretrain.train(smoke_recipe(tmp_path, synth_dir, "run.name=done", "schedule.epochs=1"))
    pretrain.train(smoke_recipe(tmp_path, synth_dir, "run.name=capped", "schedule.epochs=1", "run.max_steps=3"))
    with pytest.raises(StopRequested):
        train(smoke_recipe(tmp_path, synth_dir, "run.name=cut"), StopAfter(3, tmp_path / "runs" / "cut"))
    with pytest.raises(TrainingError):
        pretrain.train(smoke_recipe(tmp_path, synth_dir, "run.name=nan", "optimizer.lr=1e30", "schedule.warmup_epochs=0",
                               "run.max_nonfinite_steps=1", "run.checkpoint_every_steps=1"))
    assert runs_main([str(tmp_path / "runs"), "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    charts = EventAccumulator(str(tmp_path / "runs" / "done" / "tensorboard"))
    charts.Reload()  # the curves, not the bookkeeping
    tags = set(charts.Tags()["scalars"])
    assert {"train_loss", "top1", "lr"} <= tags and not tags & {"samples_digest", "val_images", "epochs_done"}, tags
    assert rows["done"]["state"] == "finished" and rows["done"]["step"] == 10 and rows["done"]["epochs_done"] == 1
    assert rows["done"]["weights"].endswith("done/model.safetensors") and rows["done"]["launcher"] == "local"
    assert rows["done"]["best"] is not None and rows["done"]["metric"] == "top1"
    capped = rows["capped"]  # the schedule's steps beside the cap, not "1/1 epochs, 3/3 steps, finished"
    assert (capped["state"], capped["epochs_done"], capped["step"], capped["schedule_steps"], capped["max_steps"]) == \
        ("finished at max_steps 3 of 10", 0, 3, 10, 3)
    assert rows["cut"]["state"] == "stopped at step 3" and rows["cut"]["checkpoint"].endswith("step-00000003")
    assert rows["cut"]["weights"] is None
    assert rows["nan"]["state"].startswith("failed at step") and "non-finite loss" in rows["nan"]["error"]
    assert runs_main([str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert re.search(r"done\s+finished\s+local\s+1/1\s+10/10", table), table
    assert re.search(r"cut\s+stopped at step 3\s+", table), table
    assert re.search(r"capped\s+finished at max_steps 3 of 10\s+local\s+0/1\s+3/10", table), table

    # The same command again on a finished run says so and writes nothing (not a "resume" that rewrites the weights
    # and the launcher); a capped run continues with a larger run.max_steps.
    def files(run: str) -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "runs" / run).rglob("*")}

    before = files("done")
    argv = [str(R / "smoke.yaml"), "--launcher", "local", "--set", *smoke_sets(tmp_path, synth_dir), "schedule.epochs=1"]
    with caplog.at_level("INFO", "orchestrator"):
        assert pretrain_main([*argv, "run.name=done"]) == 0
    assert f"{tmp_path}/runs/done is finished (step 10, weights" in caplog.text and "--fresh starts it over" in caplog.text
    assert files("done") == before
    assert pretrain_main([*argv, "run.name=capped", "run.max_steps=5"]) == 0
    assert RunDir(str(tmp_path / "runs" / "capped")).status()["step"] == 5


def test_a_world_size_that_breaks_the_sample_order_is_refused_before_anything_starts(
        synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two Ray workers, two micro-batches per step, but 3 partitions: refused before Ray starts."""
    code, _out, err = run(pretrain_main, [str(R / "smoke.yaml"), "--set", f"data.train={synth_dir}/train",
                                          f"data.val={synth_dir}/val", f"run.storage={tmp_path}/runs",
                                          "batch.global_batch_size=32", "batch.per_device_max=16", "data.partitions=3",
                                          "scaling.num_workers=2"], capsys)
    assert_one_line(err, code, 2, f"data.train={synth_dir}/train: world size 2 cannot keep the sample order",
                    "over 3 partitions (data.partitions)", "World sizes that fit: 1")
    assert not (tmp_path / "runs").exists()

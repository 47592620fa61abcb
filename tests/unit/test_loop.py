"""The training loop run by the local launcher: exact resume, atomic checkpoints, outputs, fine-tune init."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator import pretrain
from orchestrator import recipe as recipes
from orchestrator.errors import CheckpointError, TrainingError
from orchestrator.rundir import STATE, RunDir
from orchestrator.storage import RetryPolicy
from orchestrator.train.checkpoint import BackgroundCommitter
from orchestrator.train.context import StopRequested
from orchestrator.train.loop import train
from tests.conftest import ROOT, StopAfter, assert_stopped_at, signal_after_step, smoke_recipe, steps_of

# Every source of randomness on: RandAugment, random erasing, mixup/cutmix, drop path, EMA, 2 workers, accumulation.
RANDOM_EVERYTHING = ("augment.mixup=0.8", "augment.cutmix=1.0", "augment.re_prob=0.25", "model.drop_path_rate=0.1",
                     "ema.decay=0.99", "data.num_workers=2", "batch.per_device_max=16")


def weights(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run / name)


@pytest.fixture(scope="module")
def straight(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 14-step run that the stopped and resumed runs below must equal bit for bit."""
    root = tmp_path_factory.mktemp("straight")
    pretrain.train(smoke_recipe(root, synth_dir, *RANDOM_EVERYTHING, "run.name=straight", "run.max_steps=14"))
    return root / "runs" / "straight"


def test_resume_is_bitwise_exact(straight: Path, synth_dir: Path, tmp_path: Path) -> None:
    for steps in (7, 14):  # stop mid-epoch 0, resume across the epoch boundary
        pretrain.train(smoke_recipe(tmp_path, synth_dir, *RANDOM_EVERYTHING, "run.name=resumed", f"run.max_steps={steps}"))
    runs = tmp_path / "runs"
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = weights(straight, name), weights(runs / "resumed", name)
        assert a.keys() == b.keys()
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, f"{name}: {len(unequal)} tensors differ after resume, e.g. {unequal[:3]}"
    steps = [r["step"] for r in map(json.loads, (runs / "resumed" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"


def test_run_outputs(synth_dir: Path, tmp_path: Path) -> None:
    result = pretrain.train(smoke_recipe(tmp_path, synth_dir, "run.name=outputs"))
    run = tmp_path / "runs" / "outputs"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "step", "lr", "train_loss", "top1", "top5", "images_per_sec"):
        assert all(key in r for r in records)
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [10, 20]
    assert result["step"] == 20 and 0 <= result["top1"] <= 100 and result["val_images"] == 80
    assert json.loads((run / "config.json").read_text())["run"]["name"] == "outputs"
    assert (run / "curves.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert steps_of(run) == [10, 20]


def test_a_torn_checkpoint_is_never_picked(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload of step 6 dies half way (as when the node is lost): the run fails loudly, and the
    next one resumes from step 3, the newest checkpoint that was committed."""
    recipe = smoke_recipe(tmp_path, synth_dir, "run.name=torn", "run.checkpoint_every_steps=3", "run.max_steps=6")
    real_write = RunDir.write_checkpoint

    def crash_at_step_6(self: RunDir, step: int, files: dict[str, bytes], meta: dict, progress: object = None) -> None:
        if step == 6:
            folder = Path(self.path) / "checkpoints" / f"step-{step:08d}"
            folder.mkdir(parents=True)
            (folder / STATE).write_bytes(files[STATE][: len(files[STATE]) // 2])
            raise KeyboardInterrupt("node lost while writing")
        return real_write(self, step, files, meta, progress)

    monkeypatch.setattr(RunDir, "write_checkpoint", crash_at_step_6)
    with pytest.raises(CheckpointError, match="checkpoint upload to .* failed: node lost while writing"):
        pretrain.train(recipe)
    run = tmp_path / "runs" / "torn"
    assert steps_of(run) == [3] and not (run / "model.safetensors").exists()
    monkeypatch.setattr(RunDir, "write_checkpoint", real_write)
    assert pretrain.train(recipe)["step"] == 6
    assert [r["step"] for r in RunDir(str(run)).records() if r["kind"] == "resume"] == [3]
    assert steps_of(run)[-1] == 6


def test_a_failing_upload_is_retried(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = smoke_recipe(tmp_path, synth_dir, "run.name=retry", "run.checkpoint_every_steps=3", "run.max_steps=6")
    real_write, calls = RunDir.write_checkpoint, []

    def flaky(self: RunDir, step: int, files: dict[str, bytes], meta: dict, progress: object = None) -> None:
        calls.append(step)
        if calls.count(step) == 1:
            raise ConnectionError("store hiccup")
        return real_write(self, step, files, meta, progress)

    monkeypatch.setattr(RunDir, "write_checkpoint", flaky)
    monkeypatch.setattr(BackgroundCommitter, "__init__", lambda self, run, keep, policy=None, progress=None: real_init(
        self, run, keep, RetryPolicy(attempts=3, base_delay=0.01), progress))
    assert pretrain.train(recipe)["step"] == 6
    assert calls == [3, 3, 6, 6] and steps_of(tmp_path / "runs" / "retry") == [3, 6]


real_init = BackgroundCommitter.__init__


def test_keep_last_k_checkpoints(synth_dir: Path, tmp_path: Path) -> None:
    pretrain.train(smoke_recipe(tmp_path, synth_dir, "run.name=keep", "run.checkpoint_every_steps=2", "run.keep_checkpoints=2",
                           "schedule.epochs=1"))
    assert steps_of(tmp_path / "runs" / "keep") == [8, 10]


def test_non_finite_losses_stop_the_run_with_a_clear_message(synth_dir: Path, tmp_path: Path) -> None:
    recipe = smoke_recipe(tmp_path, synth_dir, "run.name=nan", "optimizer.lr=1e30", "schedule.warmup_epochs=0",
                          "run.max_nonfinite_steps=2")
    with pytest.raises(TrainingError, match=r"[34] steps with non-finite loss by step 4, more than run.max_nonfinite_steps=2"):
        pretrain.train(recipe)


def test_finetune_at_larger_size_starts_from_the_pretrain_run(synth_dir: Path, tmp_path: Path) -> None:
    pretrain.train(smoke_recipe(tmp_path, synth_dir, "run.name=pre", "run.max_steps=4", "ema.decay=0.9"))
    pre_ema = weights(tmp_path / "runs" / "pre", "model_ema.safetensors")
    fine = smoke_recipe(tmp_path, synth_dir, "run.name=fine", "model.init=pre", "data.input_size=48", "run.max_steps=1",
                        "optimizer.lr=1e-12", "schedule.warmup_epochs=0", "schedule.sched=constant")
    pretrain.train(fine)
    after = weights(tmp_path / "runs" / "fine")
    # One step at lr 1e-12 leaves the weights where the pretrain EMA put them.
    assert torch.allclose(after["stem.0.weight"], pre_ema["stem.0.weight"], atol=1e-6)


def test_fresh_moves_the_old_run_aside_and_starts_at_step_zero(synth_dir: Path, tmp_path: Path) -> None:
    pretrain.train(smoke_recipe(tmp_path, synth_dir, "run.name=again", "run.max_steps=3"))
    result = pretrain.train(smoke_recipe(tmp_path, synth_dir, "run.name=again", "run.max_steps=2"), fresh=True)
    runs = tmp_path / "runs"
    (old,) = runs.glob("again.replaced-*")
    assert steps_of(old) == [3]  # kept, untouched
    assert result["step"] == 2
    assert steps_of(runs / "again") == [2]


@pytest.mark.parametrize("stop_after", [7, 10])  # mid-epoch, and exactly at the end of epoch 0
def test_a_requested_stop_checkpoints_and_resumes_exactly(stop_after: int, straight: Path, synth_dir: Path,
                                                           tmp_path: Path) -> None:
    stopped = smoke_recipe(tmp_path, synth_dir, *RANDOM_EVERYTHING, "run.name=stopped", "run.max_steps=14")
    run = tmp_path / "runs" / "stopped"
    with pytest.raises(StopRequested):
        train(stopped, StopAfter(stop_after, run))
    assert steps_of(run)[-1] == stop_after
    assert not (run / "model.safetensors").exists()
    pretrain.train(stopped)
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_the_step_it_stopped_at_and_the_rerun_is_bitwise_exact(synth_dir: Path,
                                                                                     tmp_path: Path) -> None:
    """The local launcher as users run it, with DataLoader workers: SIGTERM to its whole process group
    mid-epoch, exit 143 naming the step, resume there."""
    sets = [f"data.train={synth_dir}/train", f"data.val={synth_dir}/val", "data.input_size=32", "data.num_workers=2",
            "batch.global_batch_size=32", "batch.per_device_max=32", "schedule.epochs=3", "run.log_every_steps=2",
            f"run.storage={tmp_path}/runs", "run.name=term"]
    run = tmp_path / "runs" / "term"
    command = [sys.executable, "-m", "orchestrator.pretrain", str(ROOT / "recipes" / "smoke.yaml"), "--launcher=local",
               "--set", *sets]
    code, stopped, err = signal_after_step(command, run, 4, 120, group=True, cwd=tmp_path)
    assert code == 143, err[-2000:]
    assert 4 <= stopped < 30 and stopped % 10  # not at an epoch end, whose scheduled checkpoint would pass for it
    assert_stopped_at(run, stopped, "SIGTERM")

    pretrain.train(recipes.load(ROOT / "recipes" / "smoke.yaml", sets))  # the same command again
    records = RunDir(str(run)).records()
    assert [r["step"] for r in records if r["kind"] == "resume"] == [stopped]
    pretrain.train(recipes.load(ROOT / "recipes" / "smoke.yaml", [*sets[:-1], "run.name=straight"]))
    a, b = weights(run), weights(tmp_path / "runs" / "straight")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_a_non_finite_step_is_skipped_and_counted_without_a_host_read(optimizer: str, synth_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """adamw: the fused kernel skips on the device flag (no update, no step count); lamb: skipped on the host.
    The count reaches ``state`` only when ``count_skipped`` reads it (log and checkpoint steps)."""
    from orchestrator.train import loop
    from orchestrator.train.context import TrainContext

    recipe = smoke_recipe(tmp_path, synth_dir, f"optimizer.name={optimizer}", "ema.decay=null")
    c = loop.build(recipe, TrainContext(run=RunDir(str(tmp_path / "runs" / "x"))), resuming=False)
    batches, state = iter(c.train_loader), {"step": 0, "nonfinite": 0}
    before = {k: v.clone() for k, v in c.model.named_parameters()}  # (BatchNorm's statistics move in any forward)
    real = c.task.loss
    monkeypatch.setattr(c.task, "loss", lambda out, t: real(out, t) * float("nan"))
    loss, _ = loop.train_step(c, recipe, TrainContext(run=RunDir(str(tmp_path))), state, batches)
    assert loss.isnan() and float(c.skipped) == 1 and state["nonfinite"] == 0
    assert all(torch.equal(before[k], v) for k, v in c.model.named_parameters())
    assert all(int(s.get("step", 0)) == 0 for s in c.optimizer.state.values())
    loop.count_skipped(c, recipe, state)
    assert state["nonfinite"] == 1 and float(c.skipped) == 0
    monkeypatch.setattr(c.task, "loss", real)
    loss, _ = loop.train_step(c, recipe, TrainContext(run=RunDir(str(tmp_path))), state, batches)
    assert torch.isfinite(loss) and float(c.skipped) == 0
    assert not any(torch.equal(before[k], v) for k, v in c.model.named_parameters() if v.dim() > 1)


def test_a_checkpoint_is_staged_in_the_step_and_encoded_off_the_training_thread(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.train import checkpoint

    state = {"w": torch.ones(3), "nested": [torch.zeros(2), {"x": torch.ones(1)}], "n": 1}
    snapshot = checkpoint.stage(state)
    state["w"].add_(1)  # training moves on
    state["nested"][1]["x"].zero_()
    restored = checkpoint.decode(snapshot.files()[STATE])
    assert torch.equal(restored["w"], torch.ones(3)) and torch.equal(restored["nested"][1]["x"], torch.ones(1))
    threads = []
    real = checkpoint.encode
    monkeypatch.setattr(checkpoint, "encode", lambda s: threads.append(threading.current_thread().name) or real(s))
    committer = BackgroundCommitter(RunDir(str(tmp_path / "run")), keep=2)
    committer.submit(1, checkpoint.stage({"w": torch.ones(2)}), {})
    committer.wait()
    assert threads == ["checkpoint-1"] and steps_of(tmp_path / "run") == [1]


def test_the_curve_helper_ends_on_close_while_a_forked_dataloader_worker_holds_its_pipe(tmp_path: Path) -> None:
    """Persistent DataLoader workers forked after the helper started hold its stdin too, so it never saw the end of
    its input: every run's end waited out the 30 s close timeout, then killed it."""
    import multiprocessing

    from orchestrator.train import curves

    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "train_loss": 2.0, "top1": 10.0, "lr": 0.001}\n')
    plotter = curves.Plotter()
    plotter.draw(jsonl, tmp_path / "curves.png", "top1")
    helper = plotter._proc
    assert helper is not None and (tmp_path / "curves.png").stat().st_size > 1000
    ctx = multiprocessing.get_context("fork")
    release = ctx.Event()
    worker = ctx.Process(target=release.wait, args=(120,))
    worker.start()
    try:
        plotter.close()
        assert helper.returncode == 0  # it read the end line; killed after the timeout it would be -9
    finally:
        release.set()
        worker.join()

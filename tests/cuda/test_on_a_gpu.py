"""What must stay true on a GPU; skipped without CUDA (the test machines have none: run it where one is lent).

The device step under ``torch.cuda.set_sync_debug_mode("error")``, a damaged JPEG on nvJPEG, the decode
stream-ordering race (pytorch/vision #9606), a short InceptionNeXt-T run in bf16 with channels_last, and worker
batches copied out of their shared-memory slots straight into pinned memory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from orchestrator.data.gpu_decode import DeviceCrop, TrainDraws
from tests.unit.test_gpu_decode import POLICY, device_batch, photo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
GPU = torch.device("cuda")


def test_the_device_step_never_syncs_with_the_host() -> None:
    from bench.data_pipeline import photo_like
    from bench.device_step import gpu_batch, step

    rng = np.random.default_rng(0)
    jpegs = [photo_like(rng) for _ in range(64)]
    run = step(GPU, 224, gpu_decode=True)
    batches = [gpu_batch(jpegs, 224) for _ in range(2)]
    run(batches[0])  # warm: first-call allocations and lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches:
            run(b)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_a_damaged_jpeg_is_not_decoded_to_garbage_on_nvjpeg() -> None:
    good = photo(1)
    frame = good.index(b"\xff\xc0") + 12
    broken = good[:frame] + b"\x03" + good[frame + 1:]
    images, _, ids, corrupt = DeviceCrop(48, GPU)(device_batch(TrainDraws(48, POLICY, "random"), [good, broken]))
    assert corrupt.tolist() == [0, 1] and ids.tolist() == [0, 0] and torch.equal(images[0], images[1])
    truncated = good[: len(good) // 2] + bytes(len(good) // 2)
    with pytest.raises(OSError):  # no end marker: Pillow in the worker, never nvJPEG
        TrainDraws(48, POLICY, "random")(truncated)


def test_decoding_does_not_overwrite_memory_the_training_stream_still_reads() -> None:
    """pytorch/vision #9606's harness: queue long work that then reads tensors, free them, decode at once."""
    crop = DeviceCrop(64, GPU)
    draws = TrainDraws(64, None, "random")
    jpegs = [photo(i, 320, 240) for i in range(16)]
    batch = default_collate([(draws(j), 0, i, 0) for i, j in enumerate(jpegs)])
    wrong = 0
    for _ in range(50):
        a = torch.randn(4096, 4096, device=GPU)
        for _ in range(20):
            a = a @ a / 64  # ~tens of ms queued
        tensors = [torch.full((3 * 320 * 240,), float(k), device=GPU) for k in range(8)]
        sums = [t.sum() for t in tensors]  # queued behind the matmuls
        del tensors
        crop.decode(batch[0][0], batch[0][1])
        wrong += sum(int(s.item()) != k * 3 * 320 * 240 for k, s in enumerate(sums))
    assert wrong == 0


def test_a_short_tiny_run_in_bf16_with_channels_last_learns(tmp_path, synth_dir) -> None:
    from orchestrator import pretrain
    from orchestrator.rundir import RunDir
    from tests.conftest import smoke_recipe

    pretrain.train(smoke_recipe(tmp_path, synth_dir, "model.name=inception_next_tiny", "scaling.gpus_per_worker=1",
                           "run.precision=bf16", "run.channels_last=true", "schedule.epochs=3", "run.log_every_steps=1",
                           "run.name=t"))
    losses = [r["train_loss"] for r in RunDir(str(tmp_path / "runs" / "t")).records() if r["kind"] == "train"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_pinned_worker_batches_are_copied_out_of_their_slots_into_pinned_memory(synth_dir) -> None:
    from orchestrator.data import manifest as mf
    from orchestrator.data.reader import ShardDataset, ShardLoader, WithLabel
    from orchestrator.data.transforms import TrainCrop

    def loader(workers: int, pin: bool) -> ShardLoader:
        ds = ShardDataset(mf.load(str(synth_dir / "train")), WithLabel(TrainCrop(32, None, "random")), train=True,
                          global_batch=16)
        return ShardLoader(ds, 8, workers, pin_memory=pin)

    pinned = loader(2, True)
    try:
        got, want = list(pinned), list(loader(0, False))
    finally:
        pinned.close()
    assert len(got) == len(want) == 40
    for g, w in zip(got, want, strict=True):
        assert all(t.is_pinned() and torch.equal(t, u) for t, u in zip(g, w, strict=True))

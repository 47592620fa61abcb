"""``python -m orchestrator.data verify``: shards checked against their manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.data.__main__ import main
from orchestrator.data.shard_writer import WriteOptions, write_dataset
from orchestrator.data.synth import SynthSource
from orchestrator.data.verify import verify


def test_verify_names_a_flipped_byte_a_missing_shard_and_a_wrong_total(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "d"
    write_dataset(SynthSource(classes=3, train=48, val=12, size=16), str(dest),
                  WriteOptions(shard_size_mb=0.004, rows_per_group=4, seed=0))
    assert main(["verify", str(dest)]) == 0
    assert "0 problems" in capsys.readouterr().out
    shards = sorted((dest / "train").glob("shard-*.parquet"))
    assert len(shards) >= 3
    flipped = bytearray(shards[0].read_bytes())
    flipped[len(flipped) // 3] ^= 0x01
    shards[0].write_bytes(bytes(flipped))
    shards[1].unlink()

    problems = verify(str(dest), expect={"val": 13}).problems
    assert any(str(shards[0]) in p and "sha256" in p for p in problems), problems
    assert any(str(shards[1]) in p and p.endswith("missing") for p in problems), problems
    assert any("val: 12 images, expected 13" in p or ("val" in p and "12 images, expected 13" in p) for p in problems)
    assert main(["verify", str(dest), "--expect", "val=13"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(problems) + 1 and out[-1].startswith(f"verify: {len(problems)} problems")

"""The one retry policy (full jitter, a deadline) and the choice of client for large objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import storage, transfer
from orchestrator.errors import StorageError


def test_retries_wait_a_full_jitter_draw_and_stop_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    clock = [0.0]
    monkeypatch.setattr(storage.time, "sleep", lambda s: (waits.append(s), clock.__setitem__(0, clock[0] + s)))
    monkeypatch.setattr(storage.time, "monotonic", lambda: clock[0])

    def fails() -> None:
        raise ConnectionError("503 SlowDown")

    policy = storage.RetryPolicy(attempts=50, base_delay=1.0, max_delay=8.0, deadline_s=60.0)
    with pytest.raises(StorageError, match="flaky: still failing after .* attempts"):
        storage.with_retries(fails, "flaky", policy)
    assert sum(waits) <= 60.0 and len(waits) > 5
    assert all(0 <= w <= min(8.0, 2**n) for n, w in enumerate(waits))
    assert len({round(w, 6) for w in waits}) == len(waits)  # drawn, not fixed: throttled ranks spread out


def test_only_throttling_is_retried_where_other_errors_fail_fast() -> None:
    calls = []

    def refused() -> None:
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(PermissionError):
        storage.with_retries(refused, "probe", retry_if=storage.throttled)
    assert len(calls) == 1
    assert storage.throttled(OSError("Please reduce your request rate.")) and not storage.throttled(OSError("nope"))


def test_large_objects_go_through_obstore_on_s3_unless_the_options_need_botocore(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3 = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s3cret-value"}
    assert transfer._s3("s3://bucket/a/b", s3)[1] == "a/b"
    assert transfer._s3("s3://bucket/a", {**s3, "profile": "team"}) is None
    assert transfer._s3("gs://bucket/a", {}) is None and transfer._s3(str(tmp_path / "a"), {}) is None
    monkeypatch.setenv("AWS_PROFILE", "team")
    assert transfer._s3("s3://bucket/a", {"endpoint_url": "http://127.0.0.1:9"}) is None
    data = bytes(range(256)) * 1000
    ticks = []
    transfer.put(str(tmp_path / "x"), data, progress=lambda: ticks.append(1))
    assert transfer.get(str(tmp_path / "x")) == data and len(ticks) == 1

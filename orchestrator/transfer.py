"""Large objects (checkpoint files) to and from storage: parallel on S3, fsspec everywhere else.

s3fs's file writer uploads one part at a time and ``pipe_file`` in waves of ten; obstore (the Python binding of
Apache Arrow's Rust ``object_store``) keeps ``IN_FLIGHT`` parts moving in a sliding window and reads one stream
without Python in the loop. ``bench/checkpoint.py`` measures each candidate against the old writer; obstore was the
fastest both ways. Its retries follow the project's ``RetryPolicy`` (full jitter, a deadline). An S3 setting obstore
cannot express here (an AWS profile, botocore config) falls back to fsspec, as do ``gs://`` and local paths.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

from orchestrator import storage

PART = 16 * 2**20  # multipart part size: also how often an upload reports progress
IN_FLIGHT = 12  # parts uploaded at once (obstore's default; boto3 uses 10)
_UNDERSTOOD = {"key", "secret", "token", "endpoint_url", "client_kwargs", "anon", "skip_instance_cache",
               "use_listings_cache", "config_kwargs"}


def put(url: str, data: bytes, options: Mapping[str, Any] | None = None,
        progress: Callable[[], None] | None = None) -> None:
    """Write ``data`` to ``url`` (replacing it); ``progress`` is called as each part is handed to the client."""
    found = _s3(url, options)
    if found is None:
        fs, path = storage.filesystem(url, options)
        with fs.open(path, "wb") as f:
            for chunk in _parts(data, progress):
                f.write(chunk)
        return
    import obstore

    store, key = found
    obstore.put(store, key, _parts(data, progress), chunk_size=PART, max_concurrency=IN_FLIGHT)


def get(url: str, options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of ``url``; FileNotFoundError when it does not exist."""
    found = _s3(url, options)
    if found is None:
        fs, path = storage.filesystem(url, options)
        return fs.cat_file(path)
    import obstore
    from obstore.exceptions import NotFoundError

    store, key = found
    try:
        return bytes(obstore.get(store, key).bytes())
    except NotFoundError as exc:
        raise FileNotFoundError(url) from exc


def download(url: str, local: str, options: Mapping[str, Any] | None = None) -> None:
    """``url`` into the local file ``local``, streamed (a shard may be larger than memory should hold)."""
    found = _s3(url, options)
    if found is None:
        fs, path = storage.filesystem(url, options)
        fs.get_file(path, local)
        return
    import obstore
    from obstore.exceptions import NotFoundError

    store, key = found
    try:
        with open(local, "wb") as f:
            for chunk in obstore.get(store, key).stream(min_chunk_size=PART):
                f.write(chunk)
    except NotFoundError as exc:
        raise FileNotFoundError(url) from exc


def _parts(data: bytes, progress: Callable[[], None] | None) -> Iterator[memoryview]:
    view = memoryview(data)
    for at in range(0, max(len(data), 1), PART):
        yield view[at:at + PART]
        if progress is not None:
            progress()


_used_in: int | None = None  # the process whose obstore runtime exists


def _s3(url: str, options: Mapping[str, Any] | None) -> tuple[Any, str] | None:
    """(obstore store, key) for an ``s3://`` URL whose options obstore can express, else None. Also None in a
    process forked after its parent used obstore (a DataLoader worker of a resumed run): the runtime's threads did
    not come along, and any obstore call there would hang."""
    if not url.startswith(("s3://", "s3a://")) or set(options or {}) - _UNDERSTOOD:
        return None
    if _used_in not in (None, os.getpid()):
        return None
    if os.environ.get("AWS_PROFILE") and not (options or {}).get("key"):
        return None  # a named profile: botocore reads ~/.aws, obstore does not
    options = dict(options or {})
    client = dict(options.get("client_kwargs") or {})
    if set(client) - {"endpoint_url", "region_name"} or set(options.get("config_kwargs") or {}) - {"retries"}:
        return None
    bucket, _, key = url.split("://", 1)[1].partition("/")
    endpoint = (options.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    config = {"endpoint": endpoint, "region": client.get("region_name") or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
              "access_key_id": options.get("key"), "secret_access_key": options.get("secret"),
              "session_token": options.get("token"), "skip_signature": bool(options.get("anon"))}
    return _store(bucket, json.dumps(config, sort_keys=True)), key


@functools.lru_cache(maxsize=16)
def _store(bucket: str, config_json: str) -> Any:
    """One client per bucket and configuration in this process (its connection pool is reused)."""
    from obstore.store import S3Store

    global _used_in
    _used_in = os.getpid()
    config = {k: v for k, v in json.loads(config_json).items() if v not in (None, False)}
    endpoint = config.pop("endpoint", None)
    policy = storage.RetryPolicy()
    retry = {"max_retries": policy.attempts - 1, "retry_timeout": timedelta(seconds=policy.deadline_s),
             "backoff": {"init_backoff": timedelta(seconds=policy.base_delay),
                         "max_backoff": timedelta(seconds=policy.max_delay), "base": 2}}
    return S3Store(bucket, endpoint=endpoint, client_options={"allow_http": bool(endpoint and endpoint.startswith("http://"))},
                   retry_config=retry, **config)

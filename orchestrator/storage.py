"""fsspec access for every URL the project touches: retries with backoff and secret redaction.

Storage options come from the environment first (fsspec's ``FSSPEC_S3_ENDPOINT_URL``, botocore's
``AWS_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID`` ...), then from explicit ``key=value`` options.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

from orchestrator.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

_SECRET_WORDS = ("secret", "token", "password", "credential", "key")
_SECRET_ENV = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")  # and *_KEY (WANDB_API_KEY); no bare KEY: too many
# harmless variables have it (AWS_ACCESS_KEY_ID names a key, it is not one)


def is_secret(name: str) -> bool:
    """Option names whose values must never be printed (``key``, ``secret``, ``aws_secret_access_key``...)."""
    lowered = name.lower()
    return lowered != "endpoint_url" and any(word in lowered for word in _SECRET_WORDS)


_known_secrets: set[str] = set()


def remember_secrets(options: Mapping[str, Any] | None) -> None:
    """Register the secret values of ``options`` so that every later ``redact`` hides them."""
    for name, value in _flatten(options or {}):
        if is_secret(name) and isinstance(value, str) and len(value) >= 4:
            _known_secrets.add(value)


def redact(text: str, options: Mapping[str, Any] | None = None) -> str:
    """Replace secrets in ``text`` with ``***``: those of ``options``, every remembered option, and the
    values of secret-named environment variables (``AWS_SECRET_ACCESS_KEY``, ``*_TOKEN``, ``*_KEY`` ...)."""
    remember_secrets(options)
    env = {v for k, v in os.environ.items()
           if (any(w in k.upper() for w in _SECRET_ENV) or k.upper().endswith("_KEY")) and len(v) >= 4}
    for value in sorted(_known_secrets | env, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def url_password(url: str | None) -> str | None:
    """The password of a ``scheme://user:password@host`` URL (a tracking URI may carry one)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).password if url else None
    except ValueError:
        return None


def one_line(exc: BaseException) -> str:
    """An error as one line, its secrets redacted (how every command reports one)."""
    return redact(" ".join(str(exc).split()) or type(exc).__name__)


def redacted_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``options`` that is safe to log or write into a manifest or config.json."""
    return {
        k: (redacted_options(v) if isinstance(v, Mapping) else "***" if is_secret(k) else v)
        for k, v in options.items()
    }


def secret_values(options: Mapping[str, Any]) -> dict[str, Any]:
    """Only the secrets of ``options``, nested dicts kept (what ``redacted_options`` hides)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, Mapping):
            if inner := secret_values(v):
                out[k] = inner
        elif is_secret(k):
            out[k] = v
    return out


def fill_secrets(options: Mapping[str, Any], secrets: Mapping[str, Any], where: str = "") -> tuple[dict[str, Any], list[str]]:
    """``options`` with each ``***`` replaced by the value at the same place in ``secrets``; and the
    dotted names of those ``secrets`` does not hold."""
    filled: dict[str, Any] = {}
    missing: list[str] = []
    for k, v in options.items():
        if isinstance(v, Mapping):
            inner = secrets.get(k)
            filled[k], lost = fill_secrets(v, inner if isinstance(inner, Mapping) else {}, f"{where}{k}.")
            missing += lost
        elif v == "***" and k in secrets:
            filled[k] = secrets[k]
        else:
            filled[k] = v
            if v == "***":
                missing.append(f"{where}{k}")
    return filled, missing


def _flatten(options: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    for k, v in options.items():
        if isinstance(v, Mapping):
            yield from _flatten(v)
        else:
            yield k, v


def parse_option(text: str) -> tuple[str, Any]:
    """Parse one ``--storage-option key=value``; ``true``/``false``/numbers become typed values."""
    if "=" not in text:
        raise ValueError(f"storage option {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    try:
        return key, int(value)
    except ValueError:
        return key, value


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the protocol-less path for ``url``. On S3, botocore retries each request in its
    ``standard`` mode (full jitter, throttling and 5xx included; 3 attempts, so that a store that is down is
    reported in seconds, and ``with_retries`` waits longer where that is wanted) unless the options say otherwise."""
    options = dict(options or {})
    if url.startswith(("s3://", "s3a://")):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"mode": "standard", "max_attempts": 3})
        options["config_kwargs"] = config
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join URL parts with ``/`` (works for local paths and object-store URLs alike)."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Local disk: renames are atomic and files can be appended to, unlike object stores."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def absolute(url: str) -> str:
    """Local relative paths made absolute (workers of a cluster do not share the driver's cwd)."""
    return url if "://" in url else os.path.abspath(url)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URL for a protocol-less ``path`` returned by ``fs`` (local paths stay plain paths)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry policy of every storage call: exponential backoff with full jitter (a wait drawn uniformly
    from 0 to ``base_delay * 2**n``, capped), so that ranks throttled together do not retry together, and a
    deadline after which the call fails, naming what it was doing."""

    attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 20.0
    deadline_s: float = 300.0

    def delays(self) -> Iterable[float]:
        for n in range(self.attempts - 1):
            yield random.uniform(0, min(self.max_delay, self.base_delay * 2**n))


@functools.cache
def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth retrying: I/O and connection failures of any fsspec backend, and obstore's.

    Cached: the first call imports botocore/aiohttp, which must not happen in a checkpoint thread while the
    main thread forks DataLoader workers (a child would inherit the held import lock and hang)."""
    errors: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        errors.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        import obstore.exceptions

        errors.append(obstore.exceptions.GenericError)
    return tuple(errors)


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy | None = None,
                 options: Mapping[str, Any] | None = None, retry_if: Callable[[BaseException], bool] | None = None) -> T:
    """Call ``fn``; on a transient error (and one ``retry_if`` accepts) wait and retry under ``policy``, then raise
    StorageError naming ``what``."""
    policy = policy or RetryPolicy()
    errors = transient_errors()
    delays = iter(policy.delays())
    attempt, start = 1, time.monotonic()
    while True:
        try:
            return fn()
        except errors as exc:  # a missing object mid-run is retried too: start-up already checked it exists
            delay = next(delays, None)
            message = redact(f"{type(exc).__name__}: {exc}", options)
            if retry_if is not None and not retry_if(exc):
                raise
            if delay is None or time.monotonic() - start + delay > policy.deadline_s:
                raise StorageError(f"{what}: still failing after {attempt} attempts in "
                                   f"{time.monotonic() - start:.0f} s: {message}") from exc
            log.warning("%s: attempt %d failed (%s); retrying in %.1fs", what, attempt, message, delay)
            time.sleep(delay)
            attempt += 1


_THROTTLED = ("SlowDown", "reduce your request rate", "Throttl", "TooManyRequests", "RequestLimitExceeded",
              "ServiceUnavailable", "Service Unavailable", "503", "InternalError", "RequestTimeout")


def throttled(exc: BaseException) -> bool:
    """The store said "not now" (503 SlowDown, 429, a 5xx): worth a retry even where others fail fast."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(word in str(seen) for word in _THROTTLED):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --- start-up checks ----------------------------------------------------------------------------
def check_reachable(url: str, options: Mapping[str, Any] | None, key: str, options_key: str) -> None:
    """Fail fast, in one line, when the store behind ``url`` cannot be used: no credentials, an
    unreachable endpoint, refused credentials or a missing bucket. ``key`` names the setting (for
    example ``run.storage``) and ``options_key`` where its options go. Reads only; writes nothing."""
    fs, path = filesystem(url, _fail_fast(url, options))
    if is_local(fs):
        return
    bucket = path.split("/", 1)[0]

    def probe() -> None:
        fs.info(bucket)  # unlike exists(), info() raises what went wrong
        if bucket != path.rstrip("/"):
            with contextlib.suppress(FileNotFoundError):  # a run folder that does not exist yet is fine
                fs.info(path)

    try:  # a store that throttles the start-up burst is waited for; any other failure is reported at once
        with_retries(probe, f"{key}={url}", options=options, retry_if=throttled)
    except FileNotFoundError as exc:
        raise StorageError(f"{key}={url}: bucket {bucket!r} does not exist at {_endpoint(options)} (create it, or "
                           f"fix the URL or endpoint_url in {options_key})") from exc
    except Exception as exc:  # noqa: BLE001 - every backend has its own error types; explain() names them
        raise StorageError(explain(exc, url, key, options_key, options)) from exc


def explain(exc: BaseException, url: str, key: str, options_key: str, options: Mapping[str, Any] | None = None) -> str:
    """One line for a storage failure: what failed and what to set (never a secret)."""
    name, text = type(exc).__name__, str(exc)
    where = f"{key}={url}"
    if name == "NoCredentialsError" or "Unable to locate credentials" in text:
        message = (f"{where}: no credentials for the store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                   f"AWS_PROFILE) in the environment, or key and secret in {options_key}")
    elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError") or isinstance(exc, ConnectionError):
        message = (f"{where}: cannot connect to {_endpoint(options)}: check endpoint_url in {options_key} "
                   "(or AWS_ENDPOINT_URL) and that the store is running")
    elif isinstance(exc, PermissionError) or any(c in text for c in ("InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                                      "AccessDenied", "Forbidden", "403")):
        message = (f"{where}: the store refused access ({name}: {text[:160]}): check AWS_ACCESS_KEY_ID and "
                   f"AWS_SECRET_ACCESS_KEY, or key and secret in {options_key}")
    else:
        message = f"{where}: {name}: {text[:300]}"
    return redact(message, options)


def _endpoint(options: Mapping[str, Any] | None) -> str:
    options = options or {}
    return (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("FSSPEC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint")


def _fail_fast(url: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options for a start-up probe: one attempt and short timeouts (botocore and s3fs retry for ~10 s otherwise)."""
    out = dict(options or {})
    if url.startswith(("s3://", "s3a://")):
        config = dict(out.get("config_kwargs") or {})
        config.setdefault("connect_timeout", 5)
        config.setdefault("read_timeout", 15)
        config["retries"] = {"max_attempts": 1}
        out |= {"config_kwargs": config, "skip_instance_cache": True}
    return out

"""A node-local cache of whole shards (``data.cache_dir``, ``data.cache_limit_gb``): shared by the node's ranks and
their DataLoader workers, kept across epochs and restarts, evicted least recently used when it outgrows its limit.

Streaming and litdata keep shards on local disk the same way: once the split fits, an epoch after the first reads
nothing from the store. The first process that needs a shard fetches it whole under a per-shard file lock (the
others wait, then open the local copy), checks it against the manifest's sha256 and renames it into place, so a
file in the cache is always complete. A reader that already has a file open keeps reading it if it is evicted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from orchestrator import transfer
from orchestrator.data.manifest import ShardInfo
from orchestrator.errors import DataError


class ShardCache:
    def __init__(self, root: str, limit_bytes: int, options: dict[str, Any] | None = None) -> None:
        self.root, self.limit, self.options = Path(root), limit_bytes, options
        self.root.mkdir(parents=True, exist_ok=True)

    def name(self, url: str, info: ShardInfo) -> str:
        """The file a shard is kept in: its URL and content (a rewritten shard gets a new name; the old one ages out)."""
        version = info.sha256 or f"{info.bytes}"
        return hashlib.sha256(f"{url}\0{version}".encode()).hexdigest()[:32] + ".parquet"

    def local(self, url: str, info: ShardInfo) -> Path | None:
        """The local copy of the shard at ``url``, fetched if needed; None when it alone is over the limit. A failed
        fetch raises (the reader retries the read it was for, under its retry policy)."""
        if info.bytes > self.limit:
            return None
        path = self.root / self.name(url, info)
        with open(f"{path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per node; the node's other readers wait for it
            if path.exists():
                os.utime(path)  # recently used
                return path
            part = path.with_suffix(f".part-{os.getpid()}")
            try:
                transfer.download(url, str(part), self.options)
                with open(part, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                if info.sha256 and digest != info.sha256:
                    raise DataError(f"shard {url}: its bytes do not match the sha256 in the manifest")
                os.replace(part, path)
            finally:
                part.unlink(missing_ok=True)  # a failed fetch leaves nothing behind
        self.evict(keep=path)
        return path

    def evict(self, keep: Path) -> None:
        """Least recently used shards out until the cache fits its limit (``keep``, just added, stays)."""
        files = _cached(self.root)
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.limit:
                break
            if p != keep:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()  # its lock file stays: a reader may be waiting on it
                total -= size


def _cached(root: Path) -> list[tuple[float, int, Path]]:
    """(last used, size, path) of each shard in the cache."""
    files = []
    for p in root.glob("*.parquet"):
        with contextlib.suppress(FileNotFoundError):  # another process evicted it meanwhile
            st = p.stat()
            files.append((st.st_mtime, st.st_size, p))
    return files


def default_limit(root: str) -> int:
    """90% of the free space on ``root``'s disk, plus what the cache holds already."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return int(0.9 * shutil.disk_usage(root).free) + sum(size for _, size, _ in _cached(Path(root)))

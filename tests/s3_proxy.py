"""An HTTP proxy in front of the S3 store: it counts, per client, what the store is asked for and how many bytes it
serves, and can answer ``503 SlowDown`` (what S3 says to a burst) to a share of the requests or above a rate.

Each ``endpoint(tag)`` is a port of its own, so a simulated node (or rank) is told apart by the port it talks to.
Requests are relayed verbatim (the Host header too, so SigV4 signatures still match at the store). With ``sink``,
writes are answered by the proxy itself and their bodies dropped: a store that costs this machine nothing, to measure
what an upload client alone can do where the store is not on the client's cores (as on a cluster).
"""

from __future__ import annotations

import http.client
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
          b"<Message>Access Denied</Message></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass(frozen=True)
class Request:
    tag: str
    method: str
    path: str  # /bucket/key without the query; a listing: /bucket/<its prefix>
    status: int
    bytes_in: int  # request body
    bytes_out: int  # response body


@dataclass
class S3Proxy:
    """``slowdown_share``: the share of requests answered 503 SlowDown (drawn with ``seed``); ``max_rate``: requests
    per second above which every request is answered so (a one-second window, over all ports); ``slowdown_next``:
    that many requests from now on are answered so, whatever the others say. ``deny``: a write (PUT or POST) whose
    path holds it is answered ``403 AccessDenied``, which no client retries (one upload that fails for good).
    ``sink``: writes (single PUTs and multipart uploads) succeed here, their bodies read and dropped."""

    upstream: str
    slowdown_share: float = 0.0
    max_rate: float | None = None
    slowdown_next: int = 0
    deny: str | None = None
    sink: bool = False
    seed: int = 0
    requests: list[Request] = field(default_factory=list)
    _servers: dict[str, ThreadingHTTPServer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _window: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def endpoint(self, tag: str = "all") -> str:
        """The URL that clients of ``tag`` use (a port of its own, started on first use)."""
        with self._lock:
            if tag not in self._servers:
                server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, tag))
                server.daemon_threads = True
                threading.Thread(target=server.serve_forever, name=f"s3-proxy-{tag}", daemon=True).start()
                self._servers[tag] = server
            return f"http://127.0.0.1:{self._servers[tag].server_address[1]}"

    def options(self, store_options: dict[str, Any], tag: str = "all") -> dict[str, Any]:
        """The store's storage options, pointed at this proxy."""
        return {**store_options, "endpoint_url": self.endpoint(tag)}

    def close(self) -> None:
        # together: each shutdown waits out its server's 0.5 s poll, and a run of 256 ports took two minutes
        stopping = [threading.Thread(target=server.shutdown) for server in self._servers.values()]
        for t in stopping:
            t.start()
        for t in stopping:
            t.join()
        for server in self._servers.values():
            server.server_close()
        self._servers.clear()

    def throttled(self) -> bool:
        with self._lock:
            if self.slowdown_next > 0:
                self.slowdown_next -= 1
                return True
            if self.max_rate is not None:
                now = time.monotonic()
                self._window = [t for t in self._window if now - t < 1.0] + [now]
                if len(self._window) > self.max_rate:
                    return True
            return self._random.random() < self.slowdown_share

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def select(self, tag: str | None = None, contains: str = "", method: str | None = None) -> Iterator[Request]:
        with self._lock:
            found = list(self.requests)
        return (r for r in found if (tag is None or r.tag == tag) and contains in r.path
                and (method is None or r.method == method))

    def bytes_served(self, tag: str | None = None, contains: str = "") -> int:
        """Response bytes of successful GETs (what the store read out), for one tag or all."""
        return sum(r.bytes_out for r in self.select(tag, contains, "GET") if r.status < 300)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()


def _handler(proxy: S3Proxy, tag: str) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(proxy.upstream)

    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=300)

        def finish(self) -> None:
            super().finish()
            self.upstream.close()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(parts)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _relay(self) -> None:
            body = self._body()
            path, _, query = self.path.partition("?")
            if prefix := parse_qs(query).get("prefix", [""])[0]:
                path = f"{path.rstrip('/')}/{prefix}"
            if self.command in ("PUT", "POST") and proxy.deny and proxy.deny in path:
                self._refuse(403, DENIED, path, body)
                return
            if proxy.throttled():
                self._refuse(503, SLOWDOWN, path, body)
                return
            if proxy.sink and self.command in ("PUT", "POST"):
                self._sink(path, parse_qs(query, keep_blank_values=True), len(body))
                return
            self.upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP and name.lower() != "content-length":
                    self.upstream.putheader(name, value)
            self.upstream.putheader("Content-Length", str(len(body)))
            self.upstream.endheaders(body)
            response = self.upstream.getresponse()
            chunked = response.getheader("Content-Length") is None and self.command != "HEAD"
            payload = response.read() if chunked else None
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP and not (chunked and name.lower() == "content-length"):
                    self.send_header(name, value)
            if chunked:
                self.send_header("Content-Length", str(len(payload or b"")))
            self.end_headers()
            sent = 0
            if payload is not None:
                self.wfile.write(payload)
                sent = len(payload)
            else:
                while chunk := response.read(2**20):
                    self.wfile.write(chunk)
                    sent += len(chunk)
            proxy.record(Request(tag, self.command, path, response.status, len(body), sent))

        def _sink(self, path: str, query: dict[str, list[str]], size: int) -> None:
            """Answer a write as S3 does (an ETag; the multipart start and end documents) without storing it."""
            bucket, _, key = path.lstrip("/").partition("/")
            if "uploads" in query:
                answer = (f'<?xml version="1.0" encoding="UTF-8"?>\n<InitiateMultipartUploadResult><Bucket>{bucket}'
                          f"</Bucket><Key>{key}</Key><UploadId>sink-{uuid.uuid4().hex}</UploadId>"
                          "</InitiateMultipartUploadResult>").encode()
            elif "uploadId" in query and self.command == "POST":
                answer = (f'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult><Bucket>{bucket}'
                          f'</Bucket><Key>{key}</Key><ETag>"sink-{size}"</ETag></CompleteMultipartUploadResult>').encode()
            else:
                answer = b""
            self.send_response(200)
            self.send_header("ETag", f'"{uuid.uuid4().hex}"')
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            proxy.record(Request(tag, self.command, path, 200, size, len(answer)))

        def _refuse(self, status: int, answer: bytes, path: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has no body (its Content-Length says what a GET would get)
                self.wfile.write(answer)
            proxy.record(Request(tag, self.command, path, status, len(body), 0))

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay  # noqa: N815

    return Relay

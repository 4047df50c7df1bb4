"""A tiny loopback reverse proxy for tests: records every request, can answer some itself.

It stands between a real client and a real server (the storage client and the storage
emulator; a browser and the service) so a test can see what went over the wire (query
strings such as `ifGenerationMatch=0`, which request carried an upload) and make the
server side answer what it cannot be made to answer for real (a 412 from storage, a 429
with `Retry-After`), while everything else is forwarded untouched.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass
class Recorded:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    injected: bool = False

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)


@dataclass
class Rule:
    when: Callable[[Recorded], bool]
    status: int
    headers: dict[str, str]
    body: bytes
    times: int
    used: int = 0


@dataclass
class RecordingProxy:
    """`with RecordingProxy("http://127.0.0.1:PORT") as proxy:` → clients use `proxy.url`."""

    upstream: str
    requests: list[Recorded] = field(default_factory=list)
    _rules: list[Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def inject(
        self,
        status: int,
        *,
        when: Callable[[Recorded], bool],
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> Rule:
        """Answer the next `times` requests matching `when` with this response instead of forwarding."""
        rule = Rule(when, status, dict(headers or {}), body, times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def recorded(self, when: Callable[[Recorded], bool] | None = None) -> list[Recorded]:
        with self._lock:
            return [request for request in self.requests if when is None or when(request)]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def _match(self, request: Recorded) -> Rule | None:
        with self._lock:
            self.requests.append(request)
            for rule in self._rules:
                if rule.used < rule.times and rule.when(request):
                    rule.used += 1
                    return rule
        return None

    def __enter__(self) -> RecordingProxy:
        upstream = urlsplit(self.upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def _relay(self) -> None:
                body = _read_body(self)
                headers = {name: value for name, value in self.headers.items()}
                request = Recorded(self.command, self.path, headers, body)
                rule = proxy._match(request)
                if rule is not None:
                    request.status, request.injected = rule.status, True
                    self._answer(rule.status, list(rule.headers.items()), rule.body)
                    return
                forwarded = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}}
                connection = http.client.HTTPConnection(upstream.hostname or "127.0.0.1", upstream.port, timeout=120)
                try:
                    connection.request(self.command, self.path, body=body or None, headers=forwarded)
                    response = connection.getresponse()
                    payload = response.read()
                    reply_headers = [
                        (k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}
                    ]
                    request.status = response.status
                    self._answer(response.status, reply_headers, payload)
                except OSError as exc:
                    request.status = 502
                    self._answer(502, [("Content-Type", "text/plain")], f"upstream failed: {exc}".encode())
                finally:
                    connection.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def do_GET(self) -> None:
                self._relay()

            def do_POST(self) -> None:
                self._relay()

            def do_PUT(self) -> None:
                self._relay()

            def do_PATCH(self) -> None:
                self._relay()

            def do_DELETE(self) -> None:
                self._relay()

            def do_OPTIONS(self) -> None:
                self._relay()

            def do_HEAD(self) -> None:
                self._relay()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-proxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        return b"".join(_chunks(handler))
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _chunks(handler: BaseHTTPRequestHandler) -> Iterator[bytes]:
    while True:
        size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            handler.rfile.readline()
            return
        yield handler.rfile.read(size)
        handler.rfile.readline()

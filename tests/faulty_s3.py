"""A fault-injecting HTTP proxy in front of an S3 endpoint (the tests' moto server).

:class:`FaultyS3` listens on loopback; point ``AWS_ENDPOINT_URL`` at :attr:`FaultyS3.endpoint`. Each
S3 request is read whole, then either answered with a fault or forwarded verbatim to the upstream
endpoint, whose response is streamed back. Transient faults hit a fraction ``rate`` of the requests
(a seeded RNG picks which); the kinds take turns (the least injected so far that fits the request,
``cut`` first), so a few dozen faults include every kind:

- ``internal``: HTTP 500 ``InternalError``
- ``unavailable``: HTTP 503 ``ServiceUnavailable``
- ``slowdown``: HTTP 503 ``SlowDown`` (S3's throttling)
- ``drop``: the connection is closed without a response (the request never reaches the upstream)
- ``cut`` (GET and HEAD requests): the request is forwarded, but its response is cut off mid-body,
  or before its first byte when it has no body. Never within the headers: libcurl takes a response
  cut off there for a complete one (pyarrow would read a HEAD cut that way as an empty object).

A fault is transient: the same request (method, path, query and byte range) is faulted at most
``max_faults`` times (2 by default), so a client that tries it ``max_faults + 1`` times gets through.
``permanent`` (``internal`` or ``denied``: HTTP 403 ``AccessDenied``) answers every request with
that error instead. :attr:`FaultyS3.injected` counts the faults per kind. moto's own control API
(``/moto-api/...``) is always forwarded.

One request per connection: every response carries ``Connection: close`` (the client then never
reuses a connection that a fault may have closed, so a fault always reaches its retry logic).
"""

from __future__ import annotations

import random
import socket
import socketserver
import threading
import uuid
from collections import Counter
from urllib.parse import urlparse

TRANSIENT = ("internal", "unavailable", "slowdown", "drop", "cut")
ERRORS = {  # kind -> (HTTP status line, S3 error code, message)
    "internal": ("500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "unavailable": ("503 Service Unavailable", "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "denied": ("403 Forbidden", "AccessDenied", "Access Denied"),
}
_HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"expect")


def _header(head: list[bytes], name: bytes) -> bytes | None:
    """The value of header ``name`` (lowercase) in the head's lines, or None."""
    for line in head[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _read_head(rfile) -> list[bytes] | None:
    """The request line and header lines (without line ends), or None at end of stream."""
    lines = []
    while True:
        line = rfile.readline(65537)
        if not line:
            return None
        line = line.rstrip(b"\r\n")
        if not line:
            return lines
        lines.append(line)


def _read_body(rfile, head: list[bytes]) -> bytes:
    """The request body as sent (chunked framing kept), by Content-Length or Transfer-Encoding."""
    if b"chunked" in (_header(head, b"transfer-encoding") or b"").lower():
        raw = []
        while True:
            size_line = rfile.readline(65537)
            raw.append(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer = rfile.readline(65537)
                    raw.append(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return b"".join(raw)
            raw.append(rfile.read(size + 2))  # the chunk and its CRLF
    return rfile.read(int(_header(head, b"content-length") or 0))


def _key(head: list[bytes]) -> bytes:
    """What makes a retry "the same request": method, path and query, and the byte range asked for."""
    return head[0] + b" " + (_header(head, b"range") or b"")


def _split_response(data: bytes) -> tuple[bytes, bytes]:
    """An HTTP response -> (head up to and including the blank line, body)."""
    end = data.find(b"\r\n\r\n")
    return (data, b"") if end < 0 else (data[: end + 4], data[end + 4 :])


def _closing(head: bytes) -> bytes:
    """A response head with its Connection/Keep-Alive headers replaced by ``Connection: close``."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [lines[0], *(h for h in lines[1:] if h.partition(b":")[0].strip().lower() not in _HOP_BY_HOP)]
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"


class FaultyS3:
    """The proxy: ``FaultyS3(upstream).start()``, then :meth:`transient` / :meth:`permanent` / :meth:`clear`.

    Counters: ``requests`` (S3 requests seen), ``seen`` (their request lines), ``injected`` (faults per kind)."""

    def __init__(self, upstream: str, seed: int = 0):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.lock = threading.Lock()
        self.clear(seed)
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._serve(self)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="faulty-s3", daemon=True)

    def start(self) -> FaultyS3:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def clear(self, seed: int = 0) -> None:
        """No faults from here on; counters zeroed; the RNG reseeded."""
        with self.lock:
            self.rate, self.kinds, self.max_faults, self.fail_with = 0.0, TRANSIENT, 2, None
            self.rng = random.Random(seed)
            self._zero()

    def _zero(self) -> None:
        self.requests, self.seen, self.injected, self.faulted = 0, [], Counter(), Counter()

    def transient(self, rate: float, kinds: tuple[str, ...] = TRANSIENT, max_faults: int = 2) -> None:
        """From here on, fault a fraction ``rate`` of the requests with ``kinds`` (each distinct
        request at most ``max_faults`` times); counters zeroed."""
        assert set(kinds) <= set(TRANSIENT), kinds
        with self.lock:
            self.rate, self.kinds, self.max_faults, self.fail_with = rate, tuple(kinds), max_faults, None
            self._zero()

    def permanent(self, kind: str) -> None:
        """From here on, answer every S3 request with ``kind``'s error (``internal``: HTTP 500,
        ``denied``: HTTP 403); counters zeroed."""
        assert kind in ERRORS, kind
        with self.lock:
            self.fail_with = kind
            self._zero()

    def _fault(self, head: list[bytes]) -> str | None:
        """The fault for this request (counted), or None to forward it."""
        target = head[0].split(b" ")[1] if b" " in head[0] else b""
        if target.startswith(b"/moto-api"):
            return None
        with self.lock:
            self.requests += 1
            self.seen.append(head[0].decode("latin-1"))
            kind = self.fail_with
            if kind is None and self.faulted[_key(head)] < self.max_faults and self.rng.random() < self.rate:
                fits = [k for k in self.kinds if k != "cut" or head[0].startswith((b"GET ", b"HEAD "))]
                kind = min(fits, key=lambda k: (self.injected[k], k != "cut")) if fits else None  # cut first
            if kind is not None:
                self.faulted[_key(head)] += 1
                self.injected[kind] += 1
        return kind

    def _serve(self, handler: socketserver.StreamRequestHandler) -> None:
        head = _read_head(handler.rfile)
        if not head:
            return
        if (_header(head, b"expect") or b"").lower() == b"100-continue":
            handler.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _read_body(handler.rfile, head)
        kind = self._fault(head)
        if kind == "drop":
            return  # closed by the server without a byte of response
        if kind in ERRORS:
            handler.wfile.write(self._error(kind, head[0].startswith(b"HEAD ")))
            return
        response = self._forward(head, body, handler, cut=kind == "cut")
        if kind == "cut":
            head_bytes, rest = _split_response(response)
            if rest:  # mid-body; a response without a body is cut before its first byte
                handler.wfile.write(_closing(head_bytes) + rest[: len(rest) // 2])

    def _forward(self, head: list[bytes], body: bytes, handler, cut: bool) -> bytes:
        """Send the request upstream (``Connection: close``); stream the response back to the
        client, or return it whole when it is to be ``cut``."""
        kept = [line for line in head[1:] if line.partition(b":")[0].strip().lower() not in _HOP_BY_HOP]
        request = b"\r\n".join([head[0], *kept, b"Connection: close"]) + b"\r\n\r\n" + body
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                more = up.recv(1 << 16)
                if not more:
                    break
                data += more
            if cut:
                while more := up.recv(1 << 16):
                    data += more
                return data
            head_bytes, rest = _split_response(data)
            handler.wfile.write(_closing(head_bytes) + rest)
            while more := up.recv(1 << 16):
                handler.wfile.write(more)
        return b""

    @staticmethod
    def _error(kind: str, is_head: bool) -> bytes:
        """An S3 error response (XML body; none for a HEAD request)."""
        status, code, message = ERRORS[kind]
        request_id = uuid.uuid4().hex[:16].upper()
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{request_id}</RequestId></Error>"
        ).encode()
        payload = b"" if is_head else xml
        headers = [
            f"HTTP/1.1 {status}",
            "Content-Type: application/xml",
            f"Content-Length: {len(payload)}",
            f"x-amz-request-id: {request_id}",
            "Connection: close",
        ]
        return "\r\n".join(headers).encode() + b"\r\n\r\n" + payload

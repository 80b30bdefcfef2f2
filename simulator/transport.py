"""HTTP/1.1 keep-alive clients for the generator, one connection per object, gevent-friendly.

Two implementations with one contract, ``request(method, path, headers, body) -> Answer``:
- RawConnection: a minimal client on a gevent socket (request bytes built with one format
  operation, response parsed by Content-Length or chunked encoding). The default: it is what
  ``python -m simulator.bench`` measured cheapest (see simulator/README.md).
- GhcConnection: geventhttpclient's HTTPClient, kept for comparison (``--client ghc``).

Failures raise TransportError with a short kind ("timeout", "connection") that becomes the
error kind in the report. A request that fails on a reused keep-alive connection before any
byte of an answer arrived is sent once more on a fresh connection (the server may have closed
an idle connection); heartbeats are deduplicated by the server, so this is safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple
from urllib.parse import urlsplit

from gevent import socket

RECV_BYTES = 65_536


class TransportError(Exception):
    """A request got no HTTP answer; ``kind`` names why."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Answer(NamedTuple):
    status: int
    retry_after_s: float | None
    body: bytes


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, base path) of an http:// URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must look like http://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


def _retry_after(value: bytes | str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: treat as "no hint", backoff still applies


class RawConnection:
    """One keep-alive connection speaking just enough HTTP/1.1 for the NexMDM API."""

    __slots__ = ("_addr", "_timeout_s", "_sock", "_prefix", "_base", "_on_connect")

    def __init__(self, url: str, timeout_s: float, on_connect: Callable[[], None] | None = None) -> None:
        host, port, base = split_url(url)
        self._addr = (host, port)
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._base = base.encode()
        self._prefix = f"Host: {host}:{port}\r\nUser-Agent: nexmdm-simulator\r\n".encode()
        self._on_connect = on_connect  # called for every TCP connection opened

    def close(self) -> None:
        """Close the connection (a new one opens on the next request)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self._addr, timeout=self._timeout_s)
        except TimeoutError:
            raise TransportError("timeout", "connect timed out") from None
        except OSError as exc:
            raise TransportError("connection", str(exc)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_connect is not None:
            self._on_connect()
        self._sock = sock
        return sock

    def request(self, method: bytes, path: bytes, headers: bytes, body: bytes | None) -> Answer:
        """Send one request (``headers``: complete header lines) and read the answer."""
        if body is None:
            data = b"%s %s%s HTTP/1.1\r\n%s%s\r\n" % (method, self._base, path, self._prefix, headers)
        else:
            data = b"%s %s%s HTTP/1.1\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
                method, self._base, path, self._prefix, len(body), headers, body,
            )
        for attempt in (0, 1):
            sock = self._sock
            fresh = sock is None
            if sock is None:
                sock = self._connect()
            try:
                sock.sendall(data)
                return self._read_answer(sock)
            except TimeoutError:
                self.close()
                raise TransportError("timeout", "no answer in time") from None
            except _NoAnswer as exc:
                self.close()
                if fresh or attempt:
                    raise TransportError("connection", str(exc)) from None
            except OSError as exc:
                self.close()
                if fresh or attempt:
                    raise TransportError("connection", str(exc)) from None
        raise AssertionError("unreachable")

    def _read_answer(self, sock: socket.socket) -> Answer:
        buf = sock.recv(RECV_BYTES)
        if not buf:
            raise _NoAnswer("the server closed the connection")
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            more = sock.recv(RECV_BYTES)
            if not more:
                raise TransportError("connection", "closed inside the answer's headers")
            buf += more
            end = buf.find(b"\r\n\r\n")
        head = buf[:end].lower()
        try:
            status = int(head[9:12])
        except ValueError:
            raise TransportError("protocol", f"not an HTTP answer: {bytes(buf[:40])!r}") from None
        length = -1
        retry_after = None
        chunked = close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"retry-after":
                retry_after = _retry_after(value.strip())
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = b"close" in value
        body = buf[end + 4:]
        if chunked:
            body = self._read_chunked(sock, body)
        elif length >= 0:
            while len(body) < length:
                more = sock.recv(max(RECV_BYTES, length - len(body)))
                if not more:
                    raise TransportError("connection", "closed inside the answer's body")
                body += more
        else:  # no length: the body runs to the end of the connection
            close = True
            while more := sock.recv(RECV_BYTES):
                body += more
        if close:
            self.close()
        return Answer(status, retry_after, body)

    def _read_chunked(self, sock: socket.socket, buf: bytes) -> bytes:
        out = bytearray()
        while True:
            while (eol := buf.find(b"\r\n")) < 0:
                buf += self._recv_more(sock)
            size = int(buf[:eol].split(b";")[0], 16)
            buf = buf[eol + 2:]
            while len(buf) < size + 2:
                buf += self._recv_more(sock)
            if size == 0:
                return bytes(out)
            out += buf[:size]
            buf = buf[size + 2:]

    @staticmethod
    def _recv_more(sock: socket.socket) -> bytes:
        more = sock.recv(RECV_BYTES)
        if not more:
            raise TransportError("connection", "closed inside a chunked body")
        return more


class _NoAnswer(Exception):
    pass


class GhcConnection:
    """The same contract on geventhttpclient (for comparison in the benchmark)."""

    def __init__(self, url: str, timeout_s: float, on_connect: Callable[[], None] | None = None) -> None:
        from geventhttpclient import HTTPClient

        host, port, base = split_url(url)
        self._base = base
        self._client = HTTPClient(host, port, concurrency=1, connection_timeout=timeout_s,
                                  network_timeout=timeout_s)
        # on_connect: geventhttpclient does not say when it connects; connections go uncounted

    def close(self) -> None:
        """Close the connection."""
        self._client.close()

    def request(self, method: bytes, path: bytes, headers: bytes, body: bytes | None) -> Answer:
        """Send one request and read the answer."""
        header_map = {}
        for line in headers.decode().split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                header_map[name] = value.strip()
        if body is not None:
            header_map["Content-Type"] = "application/json"
        try:
            response = self._client.request(method.decode(), self._base + path.decode(), body=body,
                                            headers=header_map)
            data = response.read()
            response.release()
        except TimeoutError:
            raise TransportError("timeout", "no answer in time") from None
        except OSError as exc:
            raise TransportError("connection", str(exc)) from None
        return Answer(response.status_code, _retry_after(response.get("retry-after")), data)


CLIENTS = {"raw": RawConnection, "ghc": GhcConnection}


def connect(client: str, url: str, timeout_s: float,
            on_connect: Callable[[], None] | None = None) -> RawConnection | GhcConnection:
    """A connection object of the chosen client kind (connects lazily where it can);
    ``on_connect`` is called for each TCP connection it opens (raw client only)."""
    return CLIENTS[client](url, timeout_s, on_connect)

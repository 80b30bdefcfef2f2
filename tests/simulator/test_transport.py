"""The raw HTTP/1.1 client against small gevent socket servers in this process: chunked and
length-delimited bodies, Connection: close, a keep-alive connection the server dropped, 503
with Retry-After, and a server that never answers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gevent.server import StreamServer

from simulator.transport import RawConnection, TransportError


def _read_request(sock: Any, buf: bytes) -> tuple[bytes, bytes] | None:
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest[length:]


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Any, bytes, int], bool]], str]]:
    """Start a server whose ``answer(sock, head, n)`` writes the n-th answer; False closes."""
    servers: list[StreamServer] = []

    def start(answer: Callable[[Any, bytes, int], bool]) -> str:
        count = [0]

        def handle(sock: Any, _addr: Any) -> None:
            buf = b""
            while True:
                got = _read_request(sock, buf)
                if got is None:
                    return
                head, buf = got
                count[0] += 1
                if not answer(sock, head, count[0]):
                    sock.close()
                    return

        server = StreamServer(("127.0.0.1", 0), handle)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.stop()


def test_length_and_chunked_bodies_on_one_keep_alive_connection(serve) -> None:
    def answer(sock: Any, head: bytes, n: int) -> bool:
        if n == 1:
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"a\": true}")
        else:
            sock.sendall(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"4\r\n{\"b\"\r\n5\r\n: 1}\n\r\n0\r\n\r\n")
        return True

    conn = RawConnection(serve(answer), 2)
    first = conn.request(b"POST", b"/x", b"X-Test: 1\r\n", b"{}")
    second = conn.request(b"GET", b"/y", b"", None)
    assert (first.status, first.body) == (200, b'{"a": true}')
    assert (second.status, second.body) == (201, b'{"b": 1}\n')


def test_connection_close_and_a_dropped_keep_alive_connection_reconnect(serve) -> None:
    def answer(sock: Any, head: bytes, n: int) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        return False  # the server closes after every answer

    conn = RawConnection(serve(answer), 2)
    for _ in range(3):
        assert conn.request(b"GET", b"/", b"", None).body == b"ok"

    def silent_close(sock: Any, head: bytes, n: int) -> bool:
        if n % 2 == 0:
            return False  # drop the kept-alive connection without answering
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        return True

    conn = RawConnection(serve(silent_close), 2)
    assert [conn.request(b"GET", b"/", b"", None).body for _ in range(2)] == [b"hi", b"hi"]


def test_retry_after_is_read_and_silence_times_out(serve) -> None:
    def shed(sock: Any, head: bytes, n: int) -> bool:
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 2\r\n\r\n{}")
        return True

    answer = RawConnection(serve(shed), 2).request(b"POST", b"/v1/heartbeat", b"", b"{}")
    assert (answer.status, answer.retry_after_s) == (503, 2.0)

    def never(sock: Any, head: bytes, n: int) -> bool:
        import gevent

        gevent.sleep(5)
        return False

    with pytest.raises(TransportError) as exc:
        RawConnection(serve(never), 0.3).request(b"GET", b"/", b"", None)
    assert exc.value.kind == "timeout"


def test_nobody_listening_is_a_connection_error() -> None:
    from simulator.bench import free_port

    with pytest.raises(TransportError) as exc:
        RawConnection(f"http://127.0.0.1:{free_port()}", 1).request(b"GET", b"/", b"", None)
    assert exc.value.kind == "connection"

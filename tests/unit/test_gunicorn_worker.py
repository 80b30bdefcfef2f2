"""The API worker's socket: a response's writes leave in one send, in order, large bodies stream."""

from __future__ import annotations

import socket
from pathlib import Path

from config.gunicorn_worker import CoalescingGeventWorker, CoalescingSocket


class CountingSocket:
    """A real connected socket that counts its sendall calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: list[int] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(len(data))
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return out


def test_headers_and_body_leave_in_one_send_in_order():
    a, b = socket.socketpair()
    try:
        counting = CountingSocket(a)
        out = CoalescingSocket(counting)  # type: ignore[arg-type]
        out.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        out.sendall(b"{}")
        assert counting.sends == []
        out.flush()
        assert counting.sends == [40]
        assert read_exactly(b, 40) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        out.flush()  # nothing left: no empty send
        assert counting.sends == [40]
    finally:
        a.close()
        b.close()


def test_a_large_body_streams_once_64_kib_have_gathered():
    a, b = socket.socketpair()
    b.settimeout(5)
    try:
        counting = CountingSocket(a)
        out = CoalescingSocket(counting)  # type: ignore[arg-type]
        chunk = bytes(range(256)) * 128  # 32 KiB
        out.sendall(chunk)
        assert counting.sends == []
        out.sendall(chunk)
        assert counting.sends == [64 * 1024]  # sent without waiting for the end of the response
        assert read_exactly(b, 64 * 1024) == chunk + chunk
        out.sendall(b"tail")
        out.flush()
        assert counting.sends == [64 * 1024, 4] and read_exactly(b, 4) == b"tail"
    finally:
        a.close()
        b.close()


def test_close_drops_what_was_not_sent_and_other_calls_reach_the_socket():
    a, b = socket.socketpair()
    try:
        out = CoalescingSocket(a)
        assert out.fileno() == a.fileno()
        out.sendall(b"partial")
        out.close()
        assert a.fileno() == -1
        out.flush()  # nothing buffered any more: no write on the closed socket
    finally:
        b.close()


def test_the_configured_worker_is_gunicorns_gevent_worker():
    from gunicorn.workers.ggevent import GeventWorker

    namespace: dict = {}
    conf = Path(__file__).resolve().parents[2] / "config" / "gunicorn.conf.py"
    exec(compile(conf.read_text(), str(conf), "exec"), namespace)
    assert namespace["worker_class"] == "config.gunicorn_worker.CoalescingGeventWorker"
    assert namespace["sendfile"] is False
    assert issubclass(CoalescingGeventWorker, GeventWorker)

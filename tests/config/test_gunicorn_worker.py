"""The API worker's socket: a response's writes leave in one send, in order, large bodies stream."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from api.clients import request_arrival
from config.gunicorn_worker import CoalescingGeventWorker, CoalescingSocket, ConnectionGuard, GuardedSocket


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


# ---- ConnectionGuard: slow and idle clients -------------------------------------------------


def _guard(**overrides: float) -> ConnectionGuard:
    limits = {"max_connections": 10, "header_timeout_s": 0.3, "idle_timeout_s": 0.3, "body_timeout_s": 0.3,
              "send_timeout_s": 5.0, **overrides}
    return ConnectionGuard(**limits)  # type: ignore[arg-type]


def _read_until_end(guarded: GuardedSocket) -> float:
    started = time.monotonic()
    while guarded.recv(100):
        pass
    return time.monotonic() - started


def test_headers_sent_a_byte_at_a_time_end_at_the_header_timeout():
    guard = _guard()
    server, client = socket.socketpair()
    with server, client:
        guarded = guard.admit(server)
        assert guarded is not None
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                client.send(b"G")
                time.sleep(0.05)

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            took = _read_until_end(guarded)  # bytes keep coming, yet the request ends
        finally:
            stop.set()
            sender.join()
        guard.closed(guarded)
    assert 0.2 < took < 1.0, took
    assert guard.closed_by_reason == {"header_timeout": 1} and guard.open == 0


def test_an_idle_kept_alive_connection_ends_at_the_idle_timeout():
    guard = _guard(idle_timeout_s=0.2, header_timeout_s=5.0)
    server, client = socket.socketpair()
    with server, client:
        guarded = guard.admit(server)
        assert guarded is not None
        guard.busy(guarded)
        guard.idle(guarded)  # answered; now waiting for the next request
        took = _read_until_end(guarded)
        guard.closed(guarded)
    assert 0.15 < took < 1.0, took
    assert guard.closed_by_reason == {"idle_timeout": 1}


def test_at_the_limit_the_longest_waiting_connection_is_shed_never_a_busy_one():
    guard = _guard(max_connections=2, header_timeout_s=30.0, idle_timeout_s=30.0)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        oldest = guard.admit(pairs[0][0])
        busy = guard.admit(pairs[1][0])
        assert oldest is not None and busy is not None
        guard.busy(busy)
        newest = guard.admit(pairs[2][0])  # at the limit: sheds the waiting one, not the busy one
        assert newest is not None and guard.open == 3
        assert oldest.recv(100) == b"" and oldest.shed_reason == "shed"
        guard.closed(oldest)
        guard.busy(newest)
        assert guard.admit(pairs[3][0]) is None  # every connection busy: the new one is refused
        assert guard.open == 2 and guard.closed_by_reason == {"shed": 1, "refused": 1}
        pairs[1][1].send(b"body")
        assert busy.recv(100) == b"body"  # the busy one was left alone
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_requests_arrival_is_when_its_bytes_reached_the_host_not_when_it_was_read():
    """A request the worker reads late (its event loop busy elsewhere) carries the kernel's
    receive time, for every request of a kept-alive connection; the application counts the wait."""
    guard = _guard(header_timeout_s=5.0, idle_timeout_s=5.0)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        with server, client:
            guarded = guard.admit(server)
            assert guarded is not None
            # (Linux turns receive timestamps on for the whole host a moment after the first
            # socket asks; a worker's connections keep them on)
            time.sleep(0.1)
            for _ in range(2):
                sent = time.time()
                client.sendall(b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.3)  # the loop is busy: the bytes wait in the socket
                assert guarded.recv(4096)
                assert abs(guarded.arrived_at - sent) < 0.1, guarded.arrived_at - sent
                waited = time.monotonic() - request_arrival({"gunicorn.socket": CoalescingSocket(guarded)})
                assert waited >= 0.25, waited
                guard.busy(guarded)
                guard.idle(guarded)  # answered; the next request is timed afresh
            guard.closed(guarded)
    # without a guarded socket (another server, the test client) the request arrives now
    assert abs(request_arrival({}) - time.monotonic()) < 0.01

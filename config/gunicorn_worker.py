"""The API's gunicorn worker: gunicorn's gevent worker, sending each response in one write.

gunicorn's Response writes the status line and headers with one ``sendall`` and the body with
another, so every answer costs two send system calls, two passes through gevent's socket code,
and two TCP segments for the client to read. Here the socket handed to gunicorn for a request
collects those writes and sends them together when the request is done, or as soon as 64 KiB
have gathered (a large body still streams). Nothing else changes: parsing, keep-alive,
timeouts are gunicorn's own (its error answers go to the real socket).

gunicorn answers what it rejects before the application sees it (a request line over 4094
bytes: 414, too many or too large headers: 431, a malformed request: 400) with an HTML page;
here those answers are JSON ``{"error", "detail"}`` like every other error of the API.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import gevent
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.workers import ggevent
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

# gunicorn's statuses for what it rejects itself -> our error codes
GUNICORN_ERROR_CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` (called by its worker's ``handle_error``), in JSON."""
    body = json.dumps({
        "error": GUNICORN_ERROR_CODES.get(status_int, "http_error"),
        "detail": mesg or reason,
    }).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


# The worker's handle_error looks write_error up in gunicorn.util at each call; this is the one
# place that decides its format (gunicorn offers no hook for it).
util.write_error = write_json_error


class CoalescingSocket:
    """Wraps a connected socket; ``sendall`` is buffered until ``flush`` (or 64 KiB)."""

    __slots__ = ("_sock", "_parts", "_size")
    LIMIT = 64 * 1024

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._parts: list[bytes] = []
        self._size = 0

    def sendall(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self.LIMIT:
            self.flush()

    def flush(self) -> None:
        """Send what has gathered, in one call."""
        if not self._parts:
            return
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        self._sock.sendall(data)

    def sendfile(self, *args: Any, **kwargs: Any) -> Any:  # gunicorn.conf.py sets sendfile = False
        self.flush()
        return self._sock.sendfile(*args, **kwargs)

    def close(self) -> None:
        self._parts.clear()  # gunicorn closes after a failed response: nothing more to send
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


# What a guarded connection is doing. Only the first three can be shed.
FIRST_REQUEST, KEEP_ALIVE, HEADERS, BUSY = "first_request", "keep_alive", "headers", "busy"

# Linux's SO_TIMESTAMPNS (also the ancillary message's type; Python does not name it): the
# kernel stamps each received segment with its arrival time (CLOCK_REALTIME, a timespec).
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
_TIMESTAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


def arrival_time(ancdata: list[tuple[int, int, bytes]]) -> float:
    """When the data just read reached this host (epoch seconds): the kernel's receive
    timestamp, or now when there is none."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec + nsec * 1e-9
    return time.time()


class GuardedSocket:
    """A client connection under a ConnectionGuard: every read has a deadline that depends on
    what the connection is doing, and the guard can shed it (see ConnectionGuard)."""

    __slots__ = ("_sock", "_guard", "state", "deadline", "shed_reason", "arrived_at")

    def __init__(self, sock: socket.socket, guard: ConnectionGuard) -> None:
        self._sock = sock
        self._guard = guard
        self.state = FIRST_REQUEST
        self.deadline = guard.now() + guard.header_timeout_s
        self.shed_reason: str | None = None
        # When the current request's first bytes reached this host (epoch seconds, the kernel's
        # timestamp): the application reads it (api/clients.py request_arrival) to count the
        # time a request waited before this worker got to it (event loop busy) as server time.
        self.arrived_at: float | None = None
        sock.settimeout(guard.send_timeout_s)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def recv(self, size: int) -> bytes:
        """Read, but never past this connection's deadline: an expired deadline reads as the
        end of the stream, which gunicorn's parser takes as a client that went away."""
        guard = self._guard
        remaining = self.deadline - guard.now()
        if remaining <= 0:
            guard.timed_out(self)
            return b""
        self._sock.settimeout(remaining)
        starting = self.state in (FIRST_REQUEST, KEEP_ALIVE)
        try:
            if starting:  # a request's first bytes: when did they arrive?
                data, ancdata, _, _ = self._sock.recvmsg(size, _TIMESTAMP_SPACE)
                self.arrived_at = arrival_time(ancdata)
            else:
                data = self._sock.recv(size)
        except TimeoutError:
            guard.timed_out(self)
            return b""
        except OSError:
            if self.shed_reason is None:
                raise
            return b""  # shed: gevent cancels the wait on shutdown (EBADF); the end of the stream
        finally:
            self._sock.settimeout(guard.send_timeout_s)
        if data and starting:
            # The request has begun: its headers must all arrive within the header timeout.
            self.state = HEADERS
            self.deadline = min(self.deadline, guard.now() + guard.header_timeout_s)
        return data

    def shed(self, reason: str) -> None:
        """End the connection from another greenlet: a blocked recv returns end-of-stream."""
        self.shed_reason = reason
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class ConnectionGuard:
    """A worker's defence against slow and idle clients, so that it needs no proxy in front:

    - a new connection must send its first request, and any request its request line and
      headers, within ``header_timeout_s`` of the first byte (slowloris: a header a byte at a time);
    - a kept-alive connection may wait ``idle_timeout_s`` for its next request;
    - a request body must arrive within ``body_timeout_s`` of the headers;
    - at most ``max_connections`` are open; a new one sheds the connection that has waited
      longest for a request of its own (idle, or still sending headers), never one being served.
      When every connection is being served, the new one is closed at once.
    """

    def __init__(self, max_connections: int, header_timeout_s: float, idle_timeout_s: float,
                 body_timeout_s: float, send_timeout_s: float,
                 on_close: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.body_timeout_s = body_timeout_s
        self.send_timeout_s = send_timeout_s
        self.now = clock
        self._on_close = on_close
        self.open = 0
        # Connections that may be shed, the one waiting longest first.
        self._waiting: OrderedDict[int, GuardedSocket] = OrderedDict()
        self.closed_by_reason: dict[str, int] = {}

    def _count(self, reason: str) -> None:
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + 1
        if self._on_close is not None:
            self._on_close(reason)

    def admit(self, sock: socket.socket) -> GuardedSocket | None:
        """A new connection, guarded; None when it must be refused (all connections busy)."""
        if self.open >= self.max_connections:
            if not self._waiting:
                self._count("refused")
                return None
            _, oldest = self._waiting.popitem(last=False)
            oldest.shed("shed")
        self.open += 1
        guarded = GuardedSocket(sock, self)
        self._waiting[id(guarded)] = guarded
        return guarded

    def busy(self, guarded: GuardedSocket) -> None:
        """A request is being served: its body gets body_timeout_s; it cannot be shed."""
        guarded.state = BUSY
        guarded.deadline = self.now() + self.body_timeout_s
        self._waiting.pop(id(guarded), None)

    def idle(self, guarded: GuardedSocket) -> None:
        """The answer is sent: the connection waits for its next request (keep-alive)."""
        guarded.state = KEEP_ALIVE
        guarded.deadline = self.now() + self.idle_timeout_s
        self._waiting[id(guarded)] = guarded  # to the end: the most recent waiter

    def timed_out(self, guarded: GuardedSocket) -> None:
        """A read deadline passed: counted once, by what the connection was doing."""
        if guarded.shed_reason is None:
            guarded.shed_reason = {FIRST_REQUEST: "header_timeout", HEADERS: "header_timeout",
                                   KEEP_ALIVE: "idle_timeout", BUSY: "body_timeout"}[guarded.state]

    def closed(self, guarded: GuardedSocket) -> None:
        """The connection's handler ended."""
        self.open -= 1
        self._waiting.pop(id(guarded), None)
        if guarded.shed_reason is not None:
            self._count(guarded.shed_reason)


class BulkAcceptServer(StreamServer):
    """gevent's StreamServer accepting up to ACCEPT_BATCH connections each time the listening
    socket is ready. gunicorn sets ``max_accept = 1`` when it runs several workers (so that one
    does not take them all); but then a worker accepts one connection per turn of its event
    loop, and when the loop is busy (thousands of slow clients) the kernel's accept queue
    overflows and new clients' SYNs are dropped: they retry after 1, 3, 7 s. Each worker still
    takes only what is queued when it looks."""

    ACCEPT_BATCH = 64
    _max_accept = ACCEPT_BATCH

    @property  # type: ignore[override]
    def max_accept(self) -> int:
        return self._max_accept

    @max_accept.setter
    def max_accept(self, value: int) -> None:
        self._max_accept = max(int(value), self.ACCEPT_BATCH)


class CoalescingGeventWorker(GeventWorker):
    """``worker_class`` in config/gunicorn.conf.py: ``-k gevent`` with one write per response and
    every connection under a ConnectionGuard (limits from Settings, see gunicorn.conf.py)."""

    guard: ConnectionGuard | None = None

    def init_process(self) -> None:
        from api.metrics import count_closed_connection
        from config.settings import Settings

        settings = Settings.from_env()
        self.guard = ConnectionGuard(
            settings.worker_connections, settings.http_header_timeout_s, settings.http_idle_timeout_s,
            settings.http_body_timeout_s, settings.http_send_timeout_s, on_close=count_closed_connection,
        )
        ggevent.StreamServer = BulkAcceptServer  # this worker process only (after the fork): see above
        super().init_process()

    def timeout_ctx(self) -> contextlib.AbstractContextManager[None]:
        # Reading the next request is bounded by the guarded socket's own deadlines.
        return contextlib.nullcontext()

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        client.setblocking(1)
        assert self.guard is not None
        guarded = self.guard.admit(client)
        if guarded is None:
            util.close(client)
            return
        try:
            AsyncWorker.handle(self, listener, guarded, addr)
        finally:
            self.guard.closed(guarded)

    def handle_request(self, listener_name: str, req: Any, sock: socket.socket, addr: Any) -> Any:
        guarded = sock if isinstance(sock, GuardedSocket) else None
        if guarded is not None and self.guard is not None:
            self.guard.busy(guarded)
        out = CoalescingSocket(sock)
        try:
            return super().handle_request(listener_name, req, out, addr)
        finally:
            try:
                out.flush()
            except OSError:  # the client went away; gunicorn closes the connection
                pass
            if guarded is not None and self.guard is not None:
                self.guard.idle(guarded)

    def handle_quit(self, sig: int, frame: Any) -> None:
        """Ctrl-C (SIGINT from the terminal to the whole group) or the master's SIGQUIT: exit at
        once, as gunicorn does, but without its ``sys.exit`` inside a greenlet, which gevent
        reports as a "failed with SystemExit" traceback per worker. Nothing acknowledged is at
        stake: a heartbeat is answered only after its COMMIT."""
        gevent.spawn(self._quit_now)

    def _quit_now(self) -> None:
        self.alive = False
        self.cfg.worker_int(self)
        gevent.sleep(0.1)
        logging.shutdown()
        os._exit(0)

"""The API's gunicorn worker: gunicorn's gevent worker, sending each response in one write.

gunicorn's Response writes the status line and headers with one ``sendall`` and the body with
another, so every answer costs two send system calls, two passes through gevent's socket code,
and two TCP segments for the client to read. Here the socket handed to gunicorn for a request
collects those writes and sends them together when the request is done, or as soon as 64 KiB
have gathered (a large body still streams). Nothing else changes: parsing, keep-alive,
timeouts and error answers are gunicorn's own (its error answers go to the real socket).
"""

from __future__ import annotations

import socket
from typing import Any

from gunicorn.workers.ggevent import GeventWorker


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


class CoalescingGeventWorker(GeventWorker):
    """``worker_class`` in config/gunicorn.conf.py: ``-k gevent`` with one write per response."""

    def handle_request(self, listener_name: str, req: Any, sock: socket.socket, addr: Any) -> Any:
        out = CoalescingSocket(sock)
        try:
            return super().handle_request(listener_name, req, out, addr)
        finally:
            try:
                out.flush()
            except OSError:  # the client went away; gunicorn closes the connection
                pass

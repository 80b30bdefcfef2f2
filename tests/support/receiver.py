"""A real HTTP webhook receiver for tests, on a free 127.0.0.1 port: it answers each POST as its
script says (fail with 500, hang past the sender's timeout, or accept) and keeps every request."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAIL, HANG, OK = "fail", "hang", "ok"


@dataclass
class Received:
    """One POST as the receiver saw it, and how it answered."""

    headers: dict[str, str]
    body: bytes
    behaviour: str

    @property
    def accepted(self) -> bool:
        """The receiver took the batch in (a hang is processed, only answered too late)."""
        return self.behaviour != FAIL

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def key(self) -> str:
        return self.headers["Idempotency-Key"]


@dataclass
class Receiver:
    """Start with ``start()``, stop with ``stop()``; ``script`` is consumed one POST at a time,
    then every POST is accepted. ``hang_s`` is how long a hang holds the answer back."""

    script: list[str] = field(default_factory=list)
    hang_s: float = 1.0
    received: list[Received] = field(default_factory=list)

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    behaviour = receiver.script.pop(0) if receiver.script else OK
                    receiver.received.append(Received(dict(self.headers.items()), body, behaviour))
                if behaviour == HANG:
                    time.sleep(receiver.hang_s)
                self.send_response(500 if behaviour == FAIL else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/nexmdm"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

"""Hostile HTTP against the real server (gunicorn + gevent): header injection, request
smuggling shapes, oversized request lines and headers, truncated bodies. Each is refused with
a 4xx (or the connection closed), no stack trace, no injected header echoed, and the server
keeps serving."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from tests.support.helpers import heartbeat_body

BODY = json.dumps(heartbeat_body()).encode()
HOSTILE = {
    "bare CR in header value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\rSet-Cookie: evil=1\r\n\r\n",
    "NUL in header value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "header name with space": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
    "obsolete line folding": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n",
    "too many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    "huge request line": b"GET /healthz?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "two different Content-Length": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 5\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
    "Content-Length and chunked": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    b"GET /v1/fleet/summary HTTP/1.1\r\nHost: x\r\n\r\n",
    "negative Content-Length": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "non-numeric Content-Length": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    "invalid method": b"G\x00ET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad HTTP version": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    "CRLF in the URL": b"GET /v1/devices?status=a%0d%0aSet-Cookie:%20evil=1 HTTP/1.1\r\n"
    b"Host: x\r\nx-admin: nope\r\n\r\n",
    "injected admin header via token": b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer abc\rx-admin: guess\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
}


def exchange(url: str, raw: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early on a huge request; what it answered still counts
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


@pytest.fixture(scope="module")
def hostile_server(database_url, tmp_path_factory):
    from tests.conftest import ADMIN_KEY
    from tests.faults.conftest import stop_server
    from tests.support.live import start_server

    server = start_server(database_url, ADMIN_KEY, tmp_path_factory.mktemp("hostile"), workers=1)
    yield server
    stop_server(server)
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_http(hostile_server, name):
    answer = exchange(hostile_server.url, HOSTILE[name])
    status_line, _, rest = answer.partition(b"\r\n")
    head = rest.partition(b"\r\n\r\n")[0].lower()
    if answer:  # a refusal, never a success of the smuggled or injected request
        status = int(status_line.split()[1])
        assert 400 <= status < 500, (name, status_line)
        # JSON like every other error, gunicorn's own refusals (414, 431, 400) included.
        assert b"content-type: application/json" in head, (name, answer[:300])
        assert set(json.loads(answer.partition(b"\r\n\r\n")[2])) == {"error", "detail"}, (name, answer[:300])
    assert b"traceback" not in answer.lower() and b'file "' not in answer.lower()
    assert b"set-cookie" not in head and b"evil" not in head
    assert b'"total"' not in answer  # the smuggled fleet summary was never answered
    with urllib.request.urlopen(hostile_server.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200


def test_truncated_body_does_not_hold_the_server(hostile_server):
    host, port = hostile_server.url.removeprefix("http://").split(":")
    socks = []
    for _ in range(20):  # bodies announced but never finished
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer x\r\nContent-Length: 1000\r\n\r\n{\"sent_at\"")
        socks.append(sock)
    try:
        with urllib.request.urlopen(hostile_server.url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
    finally:
        for sock in socks:
            sock.close()

"""The shipped HAProxy config (config/haproxy/haproxy.cfg) in front of a real server: the edge
serves the device plane only, answers its own errors in the API's JSON with Retry-After, drops
clients that trickle their headers, and a client cannot forge X-Forwarded-For. The Prometheus
multi-node example (file_sd) passes promtool."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.cluster import HAPROXY_CFG, ApiNode, Haproxy, Processes, start_haproxy
from tests.support.helpers import heartbeat_body
from tests.support.live import ROOT, call

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy not installed (make test-faults / drill-cluster install it as root)")


@pytest.fixture
def edge(live_server, tmp_path: Path) -> Iterator[Haproxy]:
    port = int(live_server.url.rsplit(":", 1)[1])
    admin_address = live_server.admin_url.removeprefix("http://")
    procs = Processes(tmp_path / "logs")
    try:
        yield start_haproxy(procs, tmp_path, [ApiNode("api", port, tmp_path, {})], [admin_address])
    finally:
        procs.stop_all()


def test_shipped_config_is_valid() -> None:
    result = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                            env={"NEXMDM_HAPROXY_MAXCONN": "1000", "PATH": "/usr/sbin:/usr/bin"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_edge_serves_the_device_plane_only(edge: Haproxy, live_server) -> None:
    admin = {"x-admin": live_server.admin_key}
    status, body = call(edge.operator_url + "/v1/devices/enroll", "POST", {"device_uid": "edge-1"}, admin)
    assert status == 201, body
    token = body["devices"][0]["token"]
    status, body = call(edge.url + "/v1/heartbeat", "POST", heartbeat_body(), {"Authorization": f"Bearer {token}"})
    assert status == 200 and body["device_id"] > 0
    assert call(edge.url + "/healthz")[0] == 200
    for path in ("/v1/devices", "/metrics", "/ops/pool_health", "/openapi.json", "/v1/devices/1"):
        status, body = call(edge.url + path, headers=admin)
        assert status == 404 and body["error"] == "not_found", (path, status, body)
    assert call(edge.operator_url + "/v1/devices", headers=admin)[0] == 200


def test_edge_answers_json_503_with_retry_after_when_no_node_is_up(edge: Haproxy) -> None:
    for server in ("api1", "api2", "api3"):
        edge.command(f"disable server device_plane/{server}")
    req = urllib.request.Request(edge.url + "/v1/heartbeat", data=json.dumps(heartbeat_body()).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 503
    assert err.value.headers["Retry-After"] == "2"
    assert err.value.headers["Content-Type"] == "application/json"
    assert json.loads(err.value.read())["error"] == "unavailable"


def test_edge_drops_a_client_that_trickles_its_headers(edge: Haproxy) -> None:
    """timeout http-request 5s: the headers must be complete within 5 s, however slowly they come."""
    port = int(edge.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        try:
            while time.monotonic() - started < 9:
                sock.sendall(b"X-Slow: 1\r\n")  # a byte every second keeps no idle timer from firing
                sock.settimeout(1.0)
                try:
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - started
    assert 4.5 <= elapsed < 8, elapsed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in node that answers 200 and remembers the X-Forwarded-For of each request."""

    seen: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/healthz":
            type(self).seen.append(self.headers.get("X-Forwarded-For"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_client_cannot_forge_x_forwarded_for(tmp_path: Path) -> None:
    """The edge sets (does not append to) X-Forwarded-For: the node sees the peer's address only."""
    node = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=node.serve_forever, daemon=True)
    thread.start()
    procs = Processes(tmp_path / "logs")
    try:
        address = f"127.0.0.1:{node.server_address[1]}"
        edge = start_haproxy(procs, tmp_path, [ApiNode("echo", node.server_address[1], tmp_path, {})], [address])
        port = int(edge.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n")
            assert sock.recv(4096).split(b"\r\n")[0].endswith(b" 200 OK")
    finally:
        procs.stop_all()
        node.shutdown()
    assert _Recorder.seen == ["127.0.0.1"]


def test_prometheus_multi_node_example_passes_promtool(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (make test installs it as root)")
    monitoring = ROOT / "config" / "monitoring"
    for name in ("alerts.yml", "nexmdm-nodes.json"):
        shutil.copy(monitoring / name, tmp_path / name)
    key = tmp_path / "key"
    key.write_text("k")
    cfg = (monitoring / "prometheus-nodes.yml").read_text().replace("/etc/prometheus/nexmdm_admin_key", str(key))
    (tmp_path / "prometheus-nodes.yml").write_text(cfg)
    result = subprocess.run(["promtool", "check", "config", "prometheus-nodes.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

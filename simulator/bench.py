"""python -m simulator.bench — what the generator itself costs, against a trivial local sink.

Paces a fleet (default 10,000 devices at 5,000 requests/s for 10 s) through the simulator's
own LoadRun against a tiny gevent raw-socket HTTP server in a subprocess on 127.0.0.1, which
answers every heartbeat with a canned acknowledgement. Prints the generator's CPU µs per
request, the achieved rate, its own p99 (latency from the intended send time against a sink
that does no work, so it is the generator's self-inflicted delay) and its RSS.

    python -m simulator.bench [--devices 10000] [--rate 5000] [--duration 10] [--client raw|ghc]
        [--mode pooled|per-device|new-connection] [--sink-delay-ms 0]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from api.shedding import run_delay_s
from simulator.devices import CONNECTION_MODES, POOLED

ACK = (b'{"status":"stored","device_id":1,"bucket_ts":"2026-01-01T00:00:00Z",'
       b'"clock_skew_s":0.0,"skew_corrected":false}')
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(ACK), ACK))
NOT_FOUND = b'{"error":"not_found","detail":"sink"}'
RESPONSE_404 = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(NOT_FOUND), NOT_FOUND))


def run_sink(port: int, delay_ms: float = 0.0) -> None:
    """The sink: answer each HTTP/1.1 request on a keep-alive connection with a canned ack
    (after ``delay_ms``, to play a slow server in tests)."""
    import gevent
    from gevent.server import StreamServer

    def handle(sock: Any, _addr: Any) -> None:
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                end = buf.find(b"\r\n\r\n")
            head = buf[:end]
            length = 0
            pos = head.lower().find(b"content-length:")
            if pos >= 0:
                length = int(head[pos + 15:head.find(b"\r\n", pos) if head.find(b"\r\n", pos) > 0 else None])
            while len(buf) < end + 4 + length:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            buf = buf[end + 4 + length:]
            if delay_ms:
                gevent.sleep(delay_ms / 1000)
            sock.sendall(RESPONSE if head.startswith(b"POST /v1/heartbeat") else RESPONSE_404)
            if b"connection: close" in head.lower():
                return

    server = StreamServer(("127.0.0.1", port), handle, backlog=2048)
    server.serve_forever()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_sink(delay_ms: float = 0.0) -> tuple[subprocess.Popen, int]:
    """The sink in its own process (so its CPU is not the generator's); returns (proc, port).
    The caller stops it by PID (proc.terminate())."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "simulator.bench", "--sink", str(port), "--sink-delay-ms",
                             str(delay_ms)], cwd=Path(__file__).resolve().parent.parent)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the sink did not start")


def bench(devices: int, rate: float, duration_s: float, client: str, connections: int, sink_delay_ms: float = 0.0,
          connection_mode: str = "pooled") -> dict:
    """One paced run against the sink; the figures."""
    import psutil

    from simulator.runner import LoadRun, SimConfig
    from simulator.server import EnrolledDevice

    proc, port = start_sink(sink_delay_ms)
    try:
        rss_before = psutil.Process().memory_info().rss
        waited_before = run_delay_s()
        cfg = SimConfig(url=f"http://127.0.0.1:{port}", admin_key="bench", devices=devices, duration_s=duration_s,
                        interval_s=devices / rate, jitter_s=devices / rate / 4, client=client,
                        max_connections=connections, drain_s=5, show_progress=False,
                        connection_mode=connection_mode)
        fleet = [EnrolledDevice(i + 1, f"bench-{i}", f"token-{i:032d}") for i in range(devices)]
        run = LoadRun(cfg, fleet, emit=lambda snap: None).run()
        rss_after = psutil.Process().memory_info().rss
        waited_after = run_delay_s()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    hb = run.stats.kinds["heartbeat"]
    from simulator.stats import percentiles_ms

    latency = percentiles_ms(hb.total)
    requests = run.stats.sent
    load_s = min(run.wall_s, duration_s)
    return {
        "client": client,
        "connection_mode": connection_mode,
        "devices": devices,
        "target_rate_per_s": rate,
        "achieved_rate_per_s": round(hb.ok / load_s, 1),
        "requests": requests,
        "errors": hb.errors,
        "cpu_us_per_request": round(run.cpu_s * 1e6 / requests, 1) if requests else None,
        "cpu_pct_of_one_core": round(100 * run.cpu_s / run.wall_s, 1),
        "cpu_user_us_per_request": round((run.cpu_s - run.cpu_sys_s) * 1e6 / requests, 1) if requests else None,
        "cpu_sys_us_per_request": round(run.cpu_sys_s * 1e6 / requests, 1) if requests else None,
        "p50_ms": latency["p50"], "p99_ms": latency["p99"], "p999_ms": latency["p999"], "max_ms": latency["max"],
        "lag_p99_ms": run.lag_ms["p99"],
        "gc_max_pause_ms": run.gc_max_pause_ms,
        "connections": run.connections,
        "connects": run.connects,
        "runqueue_wait_ms": round((waited_after - waited_before) * 1000, 1) if waited_before is not None else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "rss_mb": round(rss_after / 2**20, 1),
        "rss_growth_mb": round((rss_after - rss_before) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --sink PORT, be the sink)."""
    p = argparse.ArgumentParser(prog="python -m simulator.bench", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=5_000.0, help="requests per second to pace")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--client", choices=("raw", "ghc"), default="raw")
    p.add_argument("--connections", type=int, default=512)
    p.add_argument("--mode", choices=CONNECTION_MODES, default=POOLED,
                   help="how devices hold connections: pooled (shared), per-device, new-connection")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    p.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sink-delay-ms", type=float, default=0.0,
                   help="the sink answers after this long, as a server would (0)")
    args = p.parse_args(argv)
    if args.sink:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        run_sink(args.sink, args.sink_delay_ms)
        return 0
    figures = bench(args.devices, args.rate, args.duration, args.client, args.connections, args.sink_delay_ms,
                    args.mode)
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"client={figures['client']} mode={figures['connection_mode']} devices={figures['devices']:,} "
            f"paced {figures['target_rate_per_s']:,.0f}/s "
            f"for {args.duration:g} s (shared 2-core machine)\n"
            f"  achieved rate     {figures['achieved_rate_per_s']:,.1f}/s  ({figures['requests']:,} requests, "
            f"{figures['errors']} errors)\n"
            f"  CPU per request   {figures['cpu_us_per_request']} µs  "
            f"({figures['cpu_user_us_per_request']} user + {figures['cpu_sys_us_per_request']} kernel; "
            f"{figures['cpu_pct_of_one_core']} % of one core)\n"
            f"  own latency       p50 {figures['p50_ms']} ms  p99 {figures['p99_ms']} ms  p999 {figures['p999_ms']} ms"
            f"  max {figures['max_ms']} ms  (schedule lag p99 {figures['lag_p99_ms']} ms, "
            f"longest GC pause {figures['gc_max_pause_ms']} ms)\n"
            f"  CPU contention    waited {figures['runqueue_wait_ms']} ms for a CPU while runnable; "
            f"load average {figures['load_avg_1m']} on {os.cpu_count()} cores\n"
            f"  RSS               {figures['rss_mb']} MB  (+{figures['rss_growth_mb']} MB for the fleet and run), "
            f"{figures['connections']:,} connections at most, {figures['connects']:,} opened"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A closed-loop keep-alive load generator (gevent + geventhttpclient), run as its own process.

    python -m bench.loadgen --url U --tokens FILE --concurrency C --duration S

Each of C clients keeps one connection open and posts heartbeats back to back for the devices
in FILE (one token per line), bounded by S seconds. Prints one JSON line: answers and stored
heartbeats per second, latency percentiles (HDR histogram), answers by status.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402

import gevent  # noqa: E402
from geventhttpclient import URL, HTTPClient  # noqa: E402
from hdrh.histogram import HdrHistogram  # noqa: E402


def body_for(i: int, round_: int) -> bytes:
    """A realistic heartbeat body. Each round over the fleet dates it 20 s (two dedup buckets)
    further back, within the server's accepted clock skew of 300 s, so a device's successive
    heartbeats fall in distinct buckets, not retries, even when the clients come round to it every
    few seconds (a step of one bucket would not do: the clock moves forward in between)."""
    sent_at = datetime.now(UTC) - timedelta(seconds=20 * (round_ % 14))
    return json.dumps({
        "sent_at": sent_at.isoformat(), "battery_pct": i % 101, "charging": i % 3 == 0,
        "network_type": "wifi" if i % 2 else "cellular", "signal_dbm": -40 - i % 80, "app_version": "4.2.0",
        "os_version": "14", "uptime_s": 1000 + i, "free_storage_mb": 4096,
    }).encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20)
    args = parser.parse_args()
    url = URL(args.url)
    if url.host not in ("127.0.0.1", "localhost"):
        raise SystemExit("load goes to loopback only")
    tokens = [t for t in open(args.tokens).read().split() if t]
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    statuses: Counter = Counter()
    deadline = time.monotonic() + args.duration

    def client(k: int) -> None:
        http = HTTPClient(url.host, url.port, concurrency=1, connection_timeout=10, network_timeout=30)
        i = k
        while time.monotonic() < deadline:
            token = tokens[i % len(tokens)]
            i += args.concurrency
            started = time.perf_counter()
            try:
                resp = http.post("/v1/heartbeat", body=body_for(i, i // len(tokens)), headers={
                    "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
                answer = resp.read()
                statuses[resp.status_code] += 1
                if resp.status_code == 200 and b'"duplicate"' in answer:
                    statuses["duplicate"] += 1
            except Exception as exc:  # a failed request is counted, the client carries on
                statuses[type(exc).__name__] += 1
                gevent.sleep(0.05)
                continue
            hist.record_value(max(1, int((time.perf_counter() - started) * 1e6)))
        http.close()

    started = time.monotonic()
    gevent.joinall([gevent.spawn(client, k) for k in range(args.concurrency)])
    elapsed = time.monotonic() - started
    ok = statuses.get(200, 0)
    stored = ok - statuses.get("duplicate", 0)
    print(json.dumps({
        "requests": sum(statuses.values()), "ok": ok, "elapsed_s": round(elapsed, 2),
        "rate_per_s": round(ok / elapsed, 1), "stored": stored, "stored_per_s": round(stored / elapsed, 1),
        **{f"p{q}_ms": round(hist.get_value_at_percentile(p) / 1000, 2)
           for q, p in (("50", 50), ("95", 95), ("99", 99), ("999", 99.9))},
        "max_ms": round(hist.get_max_value() / 1000, 2),
        "statuses": {str(k): v for k, v in statuses.items()},
    }))


if __name__ == "__main__":
    main()

"""Open-loop fast-read load (device status and fleet summary), run as its own process.

    python -m bench.readers --url U --admin-key K --max-id N --status-rate R --summary-rate R --duration S

Requests are sent on a fixed schedule whatever the answer time, and latency is measured from the
intended send time. Prints one JSON line with p50/p95/p99 per read type.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import gevent  # noqa: E402
from geventhttpclient import URL, HTTPClient  # noqa: E402
from hdrh.histogram import HdrHistogram  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--max-id", type=int, required=True)
    parser.add_argument("--status-rate", type=float, default=50)
    parser.add_argument("--summary-rate", type=float, default=5)
    parser.add_argument("--duration", type=float, default=60)
    args = parser.parse_args()
    url = URL(args.url)
    if url.host not in ("127.0.0.1", "localhost"):
        raise SystemExit("load goes to loopback only")
    http = HTTPClient(url.host, url.port, concurrency=32, connection_timeout=10, network_timeout=30)
    hists = {"device_status": HdrHistogram(1, 60_000_000, 3), "fleet_summary": HdrHistogram(1, 60_000_000, 3)}
    statuses: Counter = Counter()
    headers = {"x-admin": args.admin_key}

    def one(kind: str, path: str, intended: float) -> None:
        try:
            resp = http.get(path, headers=headers)
            resp.read()
            statuses[f"{kind}:{resp.status_code}"] += 1
        except Exception as exc:  # counted; the schedule goes on
            statuses[f"{kind}:{type(exc).__name__}"] += 1
            return
        hists[kind].record_value(max(1, int((time.perf_counter() - intended) * 1e6)))

    def schedule(kind: str, rate: float, path_for) -> None:  # noqa: ANN001
        start = time.perf_counter()
        n = 0
        while True:
            intended = start + n / rate
            if intended - start > args.duration:
                return
            delay = intended - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            gevent.spawn(one, kind, path_for(), intended)
            n += 1

    jobs = [
        gevent.spawn(schedule, "device_status", args.status_rate,
                     lambda: f"/v1/devices/{random.randint(1, args.max_id)}"),
        gevent.spawn(schedule, "fleet_summary", args.summary_rate, lambda: "/v1/fleet/summary"),
    ]
    gevent.joinall(jobs)
    gevent.sleep(2)
    print(json.dumps({
        kind: {f"p{q}_ms": round(h.get_value_at_percentile(p) / 1000, 2)
               for q, p in (("50", 50), ("95", 95), ("99", 99))} | {"count": h.get_total_count()}
        for kind, h in hists.items()
    } | {"statuses": dict(statuses)}))


if __name__ == "__main__":
    main()

"""Run under gevent in a subprocess (as a gunicorn worker is): the group-commit writer across
a PostgreSQL restart. Prints JSON for test_db_outage.py."""

from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from api.group_commit import GroupCommitWriter  # noqa: E402
from config.settings import Settings  # noqa: E402
from db.embedded import EmbeddedCluster  # noqa: E402
from db.engine import make_engine  # noqa: E402
from db.errors import DatabaseUnavailable  # noqa: E402
from db.heartbeats import HeartbeatRow  # noqa: E402
from tests.support.helpers import writer_row as row  # noqa: E402


def attempt(writer: GroupCommitWriter, r: HeartbeatRow) -> tuple[str, float]:
    started = time.monotonic()
    try:
        writer.write(r)
        return "stored", time.monotonic() - started
    except DatabaseUnavailable as exc:
        return f"unavailable:{exc.retry_after_s}", time.monotonic() - started


def main() -> None:
    url, device_id, data_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    settings = Settings(database_url=url, db_pool_size=3, db_max_overflow=0, db_pool_timeout_s=2)
    engine = make_engine(settings)
    writer = GroupCommitWriter(engine, settings)
    cluster = EmbeddedCluster(data_dir)
    cluster.port = int(url.rsplit(":", 1)[1].split("/")[0])
    out: dict = {"before": attempt(writer, row(device_id, 0))}
    cluster.stop("fast")
    down = [gevent.spawn(attempt, writer, row(device_id, 1 + i)) for i in range(20)]
    out["down"] = [g.get() for g in down]
    # Later batches while it is still down: the flusher has to connect afresh, and cannot.
    out["down"] += [attempt(writer, row(device_id, 30 + i)) for i in range(3)]
    out["checked_out_down"] = engine.pool.checkedout()
    cluster.start()
    up = time.monotonic()
    n = 100
    while True:
        status, _ = attempt(writer, row(device_id, n))
        if status == "stored" or time.monotonic() - up > 20:
            break
        n += 1
        gevent.sleep(0.1)
    out["recovered_s"] = time.monotonic() - up
    out["after"] = status
    out["checked_out_after"] = engine.pool.checkedout()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

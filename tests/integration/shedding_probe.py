"""Run under gevent in a subprocess (as a gunicorn worker is): drive a GroupCommitWriter into
each overload condition and print, as JSON, how it answered. Used by test_shedding.py."""

from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from api.ingest import GroupCommitWriter  # noqa: E402
from config.settings import Settings  # noqa: E402
from db.engine import make_engine  # noqa: E402
from db.errors import Overloaded  # noqa: E402
from db.heartbeats import HeartbeatRow  # noqa: E402
from tests.helpers import writer_row as row  # noqa: E402


def attempt(writer: GroupCommitWriter, r: HeartbeatRow) -> tuple[str, float]:
    started = time.monotonic()
    try:
        writer.write(r)
        return "stored", time.monotonic() - started
    except Overloaded:
        return "shed", time.monotonic() - started


def main() -> None:
    url, device_id = sys.argv[1], int(sys.argv[2])
    settings = Settings(database_url=url, ingest_max_queue_delay_ms=300, ingest_max_loop_lag_ms=200,
                        db_pool_size=4, db_max_overflow=0)
    engine = make_engine(settings)
    writer = GroupCommitWriter(engine, settings)
    out: dict = {}
    out["idle"] = attempt(writer, row(device_id, 1))

    # 1. The database stalls (a lock held elsewhere): queued heartbeats age; once the oldest
    #    has waited 300 ms, new ones are refused at once instead of joining the queue.
    blocker = engine.connect()
    blocker.exec_driver_sql("LOCK TABLE device_last_status IN EXCLUSIVE MODE")
    stuck = []
    for i in range(3):  # one batch per flusher, then one waiting in the queue
        stuck.append(gevent.spawn(attempt, writer, row(device_id, 2 + i)))
        gevent.sleep(0.02)
    gevent.sleep(0.45)
    out["stalled_late"] = attempt(writer, row(device_id, 11))
    blocker.rollback()
    blocker.close()
    out["stuck"] = [g.get() for g in stuck]
    out["after_stall"] = attempt(writer, row(device_id, 12))

    # 2. The worker's CPU is saturated (a greenlet hogs the loop for 400 ms): refused at once.
    def hog() -> None:
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            pass

    gevent.spawn(hog).join()
    gevent.sleep(0.001)  # the lag watcher, due during the hog, now records how late it ran
    out["lag_ms"] = writer.loop_lag_s * 1000
    out["shed_fraction"] = writer.shed_fraction
    refused = 0
    for _ in range(400):  # no yield in between: the fraction stays as it is
        try:
            writer.check_admission()
        except Overloaded:
            refused += 1
    out["refused_of_400"] = refused
    gevent.sleep(1.5)  # the loop keeps time again: the fraction falls back to 0
    out["shed_fraction_after"] = writer.shed_fraction
    out["after_busy"] = attempt(writer, row(device_id, 14))
    out["stats"] = writer.stats()

    # 3. Linger: heartbeats arriving 10 ms apart share one statement when the flush may wait
    #    (up to 200 ms, until 4 are queued), and the wait ends as soon as the 4th is there; with
    #    no linger each goes on its own.
    for name, linger_ms in (("linger", 200), ("no_linger", 0)):
        w = GroupCommitWriter(engine, settings.with_overrides(ingest_linger_ms=linger_ms, ingest_linger_rows=4))
        base = 20 if linger_ms else 30
        sends = []
        for i in range(4):
            sends.append(gevent.spawn(attempt, w, row(device_id, base + i)))
            gevent.sleep(0.01)
        results = [g.get() for g in sends]
        out[name] = {"stored": [status for status, _ in results], "first_s": results[0][1], "flushes": w.flushes}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

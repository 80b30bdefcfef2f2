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

from api.group_commit import GroupCommitWriter  # noqa: E402
from config.settings import Settings  # noqa: E402
from db.engine import make_engine  # noqa: E402
from db.errors import Overloaded  # noqa: E402
from db.heartbeats import HeartbeatRow  # noqa: E402
from tests.support.helpers import writer_row as row  # noqa: E402


def attempt(writer: GroupCommitWriter, r: HeartbeatRow) -> tuple[str, float]:
    started = time.monotonic()
    try:
        writer.write(r)
        return "stored", time.monotonic() - started
    except Overloaded:
        return "shed", time.monotonic() - started


def admissions(writer: GroupCommitWriter, n: int) -> int:
    """How many of ``n`` new requests in a row (no yield in between) are admitted; those admitted
    stay in flight until all ``n`` have been decided, as requests waiting for their write do."""
    admitted = 0
    for _ in range(n):
        try:
            writer.check_admission()
            admitted += 1
        except Overloaded:
            pass
    for _ in range(admitted):
        writer.release()
    return admitted


def hog(seconds: float, chunk_s: float) -> None:
    """Keep the loop busy for ``seconds``, letting it run its timers and I/O only every
    ``chunk_s`` (as a saturated worker does between requests)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        chunk_end = min(end, time.monotonic() + chunk_s)
        while time.monotonic() < chunk_end:
            pass
        gevent.sleep(0.001)


def main() -> None:
    url, device_id = sys.argv[1], int(sys.argv[2])
    settings = Settings(database_url=url, ingest_shed_target_ms=50, ingest_shed_interval_ms=100,
                        db_pool_size=4, db_max_overflow=0)
    engine = make_engine(settings)
    writer = GroupCommitWriter(engine, settings)
    out: dict = {}
    out["idle"] = attempt(writer, row(device_id, 1))

    # 1. A burst: the loop stalls once for 300 ms, then keeps time. The smallest wait of the
    #    interval stays under the target: nothing is refused (a fixed lag bound would have shed).
    hog(0.3, 0.3)
    gevent.sleep(0.3)
    out["burst_overloaded"] = writer.shedder.overloaded
    out["burst_admitted_of_100"] = admissions(writer, 100)

    # 2. The database stalls (a lock held elsewhere): queued heartbeats age past the target for
    #    interval after interval, nothing is acknowledged, and within ~0.5 s new ones are admitted
    #    only up to the limit's floor.
    blocker = engine.connect()
    blocker.exec_driver_sql("LOCK TABLE device_last_status IN EXCLUSIVE MODE")
    stuck = []
    for i in range(3):  # one batch in flight, then some waiting in the queue
        stuck.append(gevent.spawn(attempt, writer, row(device_id, 2 + i)))
        gevent.sleep(0.02)
    gevent.sleep(0.7)
    out["stalled"] = {"overloaded": writer.shedder.overloaded, "limit": writer.shedder.limit}
    out["stalled_admitted_of_100"] = admissions(writer, 100)
    blocker.rollback()
    blocker.close()
    out["stuck"] = [g.get() for g in stuck]
    gevent.sleep(2.5)  # the queue drained: the overload is over
    out["after_stall_overloaded"] = writer.shedder.overloaded
    out["after_stall"] = attempt(writer, row(device_id, 12))

    # 3. The worker's CPU is saturated for a second (the loop yields only every 80 ms, nothing is
    #    acknowledged): new heartbeats beyond the limit are refused at once, and none once the
    #    loop keeps time again.
    hog(1.0, 0.08)
    out["lag_ms"] = writer.loop_lag_s * 1000
    out["busy"] = {"overloaded": writer.shedder.overloaded, "limit": writer.shedder.limit}
    out["refused_of_400"] = 400 - admissions(writer, 400)
    gevent.sleep(2.5)
    out["busy_after"] = {"overloaded": writer.shedder.overloaded, "refused_share": writer.shed_fraction}
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

"""NexMDM behind PgBouncer 1.18 (Debian 12) in transaction pooling mode.

Transaction pooling hands each transaction (each statement, in autocommit) whichever server
connection is free. Two things of ours meet that: the group-commit writer's PREPAREd insert
(it exists only on the server connection that prepared it), and the ``options`` startup
parameter that sets statement_timeout and timezone (PgBouncer 1.18 refuses unknown startup
parameters unless told to ignore them; the role then carries those settings). These tests run
a real PgBouncer in front of the test cluster.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
from sqlalchemy import text

from config.settings import Settings
from db.embedded import SYSTEM_USER, prepare_run_as, run_as_user
from db.engine import make_engine
from db.heartbeats import HeartbeatRow, insert_heartbeats, prepare_insert
from tests.conftest import ADMIN_KEY
from tests.support.helpers import heartbeat_body
from tests.support.live import free_port, start_server

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

pytestmark = pytest.mark.skipif(
    not os.path.exists(PGBOUNCER),
    reason="pgbouncer not installed (make test installs Debian's package when run as root)",
)


def _row(device_id: int, minute: int) -> HeartbeatRow:
    now = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=minute)
    return HeartbeatRow(device_id=device_id, bucket_ts=now, sent_at=now, received_at=now, clock_skew_s=0.0,
                        battery_pct=50, charging=False, network_type="wifi", signal_dbm=-60, app_version="1",
                        os_version="14", uptime_s=1, free_storage_mb=1, extra_json=None)


@pytest.fixture
def pgbouncer(database_url: str) -> Iterator[str]:
    """A transaction-pooling PgBouncer on a free port in front of the test database; its URL."""
    pg = urlsplit(database_url)
    # A new directory under /tmp: PgBouncer's system user reaches it wherever the checkout is.
    work = Path(tempfile.mkdtemp(prefix="nexmdm-pgbouncer-"))
    user = run_as_user()  # PgBouncer, like PostgreSQL, refuses to run as root
    prepare_run_as(user, [work])
    port = free_port()
    password = f" password={pg.password}" if pg.password else ""
    (work / "userlist.txt").write_text(f'"{pg.username}" "{pg.password or ""}"\n')
    (work / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{pg.path.lstrip('/')} = host={pg.hostname} port={pg.port} dbname={pg.path.lstrip('/')} "
        f"user={pg.username}{password}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {work / 'userlist.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 500\n"
        # statement_timeout and timezone then come from the role (ALTER ROLE ... SET), see SCALING.md
        "ignore_startup_parameters = options,extra_float_digits\n"
        f"logfile = {work / 'pgbouncer.log'}\n"
    )
    if user:
        entry = pwd.getpwnam(SYSTEM_USER)
        for path in (work, *work.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    proc = subprocess.Popen([PGBOUNCER, str(work / "pgbouncer.ini")], user=user, cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"postgresql://{pg.username}{':' + pg.password if pg.password else ''}@127.0.0.1:{port}{pg.path}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg2.connect(url, connect_timeout=1).close()
                break
            except psycopg2.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (work / "pgbouncer.log").read_text() if (work / "pgbouncer.log").exists() else ""
                    raise RuntimeError(f"pgbouncer did not start: {log[-2000:]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def _enrolled_device(engine) -> int:
    with engine.begin() as conn:
        return conn.execute(text(
            "INSERT INTO devices (device_uid, token_hash) VALUES ('bouncer-1', '\\x00') RETURNING id")).scalar_one()


def _hold_other_server_connection(url: str):
    """A client inside a transaction: it keeps the server connection PgBouncer hands out next
    (the one just released, LIFO), so the next statement of another client runs elsewhere."""
    holder = psycopg2.connect(url)
    holder.cursor().execute("SELECT 1")  # psycopg2 opened a transaction: the server connection stays taken
    return holder


def test_prepared_insert_breaks_under_transaction_pooling(pgbouncer: str, engine) -> None:
    device_id = _enrolled_device(engine)
    conn = psycopg2.connect(pgbouncer)
    conn.autocommit = True
    prepare_insert(conn)
    holder = _hold_other_server_connection(pgbouncer)
    try:
        with pytest.raises(psycopg2.errors.InvalidSqlStatementName):
            insert_heartbeats(conn, [_row(device_id, 0)], prepared=True)
    finally:
        holder.close()
        conn.close()


def test_unprepared_insert_works_under_transaction_pooling(pgbouncer: str, engine) -> None:
    device_id = _enrolled_device(engine)
    conn = psycopg2.connect(pgbouncer)
    conn.autocommit = True
    holder = _hold_other_server_connection(pgbouncer)
    try:
        assert insert_heartbeats(conn, [_row(device_id, 0)], prepared=False) == [True]
        assert insert_heartbeats(conn, [_row(device_id, 0), _row(device_id, 1)], prepared=False) == [False, True]
    finally:
        holder.close()
        conn.close()
    with engine.connect() as check:
        assert check.execute(text("SELECT count(*) FROM heartbeats WHERE device_id = :d"),
                             {"d": device_id}).scalar_one() == 2


def test_startup_options_need_ignoring(pgbouncer: str, database_url: str) -> None:
    """Our engine sends statement_timeout and timezone as the ``options`` startup parameter:
    PgBouncer 1.18 refuses that unless told to ignore it, and then the server never sees it."""
    settings = Settings(database_url=pgbouncer, db_pool_size=1, db_max_overflow=0, db_statement_timeout_ms=12_345)
    direct = make_engine(settings, database_url)
    bounced = make_engine(settings, pgbouncer)
    try:
        with direct.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "12345ms"
        with bounced.connect() as conn:
            through_pgbouncer = conn.execute(text("SHOW statement_timeout")).scalar_one()
    finally:
        direct.dispose()
        bounced.dispose()
    assert through_pgbouncer != "12345ms", "PgBouncer passed the options parameter on; SCALING.md says otherwise"


def test_server_through_pgbouncer_without_prepared_statements(pgbouncer: str, engine, tmp_path: Path) -> None:
    """The real server (group commit, gevent) through PgBouncer with DB_PREPARED_STATEMENTS off:
    every heartbeat of concurrent devices acknowledged and stored."""
    server = start_server(pgbouncer, ADMIN_KEY, tmp_path, workers=2, DB_PREPARED_STATEMENTS="false",
                          DB_POOL_SIZE="8", DB_MAX_OVERFLOW="0", SCHEDULER_ENABLED="false")
    try:
        body = json.dumps({"devices": [{"device_uid": f"pgb-{i}"} for i in range(40)]}).encode()
        req = urllib.request.Request(server.admin_url + "/v1/devices/enroll", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "x-admin": ADMIN_KEY})
        with urllib.request.urlopen(req, timeout=30) as resp:
            tokens = [d["token"] for d in json.loads(resp.read())["devices"]]
        start = datetime.now(UTC) - timedelta(minutes=2)

        def send(i: int) -> int | str:
            """200, or the error code of the answer. A 503 "overloaded" (the worker shedding on a
            busy machine) is retried after its Retry-After, as a device would; nothing else is."""
            sent_at = start + timedelta(seconds=10 * (i // len(tokens)))
            for _ in range(10):
                req = urllib.request.Request(
                    server.url + "/v1/heartbeat", data=json.dumps(heartbeat_body(sent_at)).encode(), method="POST",
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {tokens[i % len(tokens)]}"})
                try:
                    with urllib.request.urlopen(req, timeout=15) as resp:
                        return resp.status
                except urllib.error.HTTPError as err:
                    error = json.loads(err.read()).get("error")
                    if err.code != 503 or error != "overloaded":
                        return f"{err.code} {error}"
                    time.sleep(float(err.headers.get("Retry-After", "1")) / 2)
            return "503 overloaded"

        with ThreadPoolExecutor(max_workers=32) as pool:
            statuses = list(pool.map(send, range(len(tokens) * 5)))
    finally:
        server.stop()
    assert statuses == [200] * len(statuses), {s: statuses.count(s) for s in set(statuses)}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM heartbeats")).scalar_one() == len(statuses)

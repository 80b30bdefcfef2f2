"""Fixtures: a real PostgreSQL (the embedded cluster, under var/test-pg), migrated once per
session and emptied between tests; the Flask app and a live gunicorn server on top of it.

At the session's end it fails the run when a process the tests started outlives it (every such
process carries the session's mark in its environment) or when the tests created the checkout's
own embedded cluster (var/pg), and stops and removes what they left."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from sqlalchemy import Engine

from config.settings import PROJECT_ROOT, Settings
from db.embedded import EmbeddedCluster
from db.engine import make_engine
from db.events import event_partition_name, list_event_partitions, maintain_event_partitions
from db.migrate import upgrade
from db.partitions import create_partition, list_partitions, lock_partition_ddl, plan_partitions

ADMIN_KEY = "test-admin-key-0123456789"
TABLES = ("devices, heartbeats, device_last_status, hb_partitions, job_runs, device_event_state, events, "
          "webhooks, webhook_deliveries, audit_log, operator_keys")


# Set in every test process's environment, hence in that of every process a test starts.
SESSION_MARK = "NEXMDM_TEST_SESSION"
CHECKOUT_PG = PROJECT_ROOT / "var" / "pg"  # the checkout's own cluster (make run): never the tests'
_checkout_pg_before: list[bool] = []


def start_test_cluster(data_dir: Path) -> EmbeddedCluster:
    """The tests' cluster in ``data_dir``, started. One without its password file (made before
    password authentication, or the file deleted) is removed and made afresh, with a message:
    nobody could log in to it, and its data is the tests' own."""
    cluster = EmbeddedCluster(data_dir)
    if cluster.initialized() and not cluster.password_file.exists():
        print(f"\nnexmdm tests: {cluster.link} has no password file ({cluster.password_file}): made before "
              "password authentication or the file was deleted; removing the test cluster and creating it afresh",
              file=sys.stderr, flush=True)
        cluster.remove()
        cluster = EmbeddedCluster(data_dir)
    cluster.start()
    return cluster


def link_test_cluster(pg_cluster: EmbeddedCluster, var_dir: Path) -> Path:
    """``var_dir`` made a VAR_DIR whose embedded cluster (``pg``) is the tests' own: its data
    directory and its port and password files linked, so a command-line tool run with it
    (``python -m db start``, ``db replica start``) finds that cluster running and starts none."""
    var_dir.mkdir(parents=True, exist_ok=True)
    (var_dir / "pg").symlink_to(pg_cluster.data_dir)
    (var_dir / "pg.port").symlink_to(pg_cluster.port_file)
    (var_dir / "pg.password").symlink_to(pg_cluster.password_file)
    return var_dir


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[EmbeddedCluster]:
    """A PostgreSQL cluster of the tests' own; DATABASE_URL from outside is never touched."""
    cluster = start_test_cluster(PROJECT_ROOT / "var" / "test-pg")
    cluster.recreate_database()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def database_url(pg_cluster: EmbeddedCluster) -> str:
    upgrade(pg_cluster.url)
    return pg_cluster.url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        admin_key=ADMIN_KEY,
        var_dir=tmp_path,
        archive_dir=tmp_path / "archive",
        db_pool_size=5,
        db_max_overflow=5,
        scheduler_enabled=False,
        # Tests post many heartbeats per device and many bad tokens; the limits have their own
        # tests (tests/api/test_attacks.py).
        device_max_per_minute=0,
        auth_failure_limit=0,
    )


@pytest.fixture(scope="session")
def session_engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(Settings(database_url=database_url, db_pool_size=5, db_max_overflow=5), database_url)
    yield engine
    engine.dispose()


def empty_database(engine: Engine) -> None:
    """Empty every table of TABLES as ``TRUNCATE ... RESTART IDENTITY`` would, and leave
    heartbeats and events with exactly today's and the next 7 days' partitions (days another test
    made, e.g. a job run with a clock in the past, are dropped), the heartbeats' recorded in
    hb_partitions as the partitions job records them.

    As cheap as that can be (it runs before most tests): only the tables holding rows are
    truncated, the other tables' sequences restart, and the week's partitions are kept (emptied
    with their table) rather than dropped and made again; any other partition is dropped.
    Truncating everything and remaking the partitions took 0.4-0.8 s a test on the shared
    machine, this 0.06-0.09 s."""
    today = datetime.now(UTC).date()
    week = plan_partitions(set(), today, 7)
    tables = [name.strip() for name in TABLES.split(",")]
    with engine.begin() as conn:
        lock_partition_ddl(conn)
        for name in sorted(list_partitions(conn) - {spec.name for spec in week}):
            conn.exec_driver_sql(f"DROP TABLE {name}")
        event_week = {event_partition_name(spec.day) for spec in week}
        for name in sorted(list_event_partitions(conn) - event_week):
            conn.exec_driver_sql(f"DROP TABLE {name}")
        holding = conn.exec_driver_sql("SELECT " + ", ".join(f"EXISTS (SELECT FROM {t})" for t in tables)).one()
        filled = {t for t, rows in zip(tables, holding, strict=True) if rows}
        # A table is truncated with those that reference it (PostgreSQL refuses it alone).
        references = conn.exec_driver_sql(
            "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint WHERE contype = 'f'"
        ).fetchall()
        while extra := {child for child, parent in references if parent in filled and child not in filled}:
            filled |= extra
        if filled:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(sorted(filled))} RESTART IDENTITY")
        conn.exec_driver_sql(
            "SELECT setval(s.seqrelid, s.seqstart, false) FROM pg_sequence s "
            "JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid AND d.deptype IN ('a', 'i') "
            "JOIN pg_class t ON t.oid = d.refobjid WHERE t.relname = ANY(%(empty)s)",
            {"empty": [t for t in tables if t not in filled]},
        )
        for spec in week:
            create_partition(conn, spec)  # idempotent: creates a missing one, records each as active
        maintain_event_partitions(conn, today, 7, None)


@pytest.fixture
def engine(session_engine: Engine) -> Engine:
    """The test database, emptied (empty_database)."""
    empty_database(session_engine)
    return session_engine


@pytest.fixture
def app(settings: Settings, engine: Engine):
    from api.app import create_app

    app = create_app(settings, engine=engine)
    app.testing = True
    yield app
    app.extensions["nexmdm"].close()  # the writer's greenlets and its connection


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def admin() -> dict[str, str]:
    return {"x-admin": ADMIN_KEY}


@pytest.fixture
def live_server(database_url: str, engine: Engine, tmp_path: Path):
    from tests.support.live import start_server

    server = start_server(database_url, ADMIN_KEY, tmp_path)
    yield server
    server.stop()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONHASHSEED", "0")


def pytest_sessionstart(session: pytest.Session) -> None:
    # A new mark even when inherited: a pytest run by a test checks its own processes only.
    os.environ[SESSION_MARK] = uuid.uuid4().hex
    _checkout_pg_before[:] = [CHECKOUT_PG.exists() or CHECKOUT_PG.is_symlink()]


def started_by_this_session() -> list[psutil.Process]:
    """Every live process that a test of this session started, however it was started or
    re-parented (pg_ctl's postmaster, gunicorn masters and workers, drills' daemons): those
    whose environment carries this session's mark. pytest itself started without it."""
    mark = os.environ.get(SESSION_MARK)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and mark and proc.environ().get(SESSION_MARK) == mark:
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or a kernel thread
            continue
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid}"


def stop_leftovers(procs: list[psutil.Process]) -> None:
    """Stop processes by PID: a postmaster with a fast shutdown (SIGINT; its backends end with
    it), anything else with SIGTERM, and SIGKILL for what is left after 10 s."""
    for proc in procs:
        try:
            parent = proc.parent()
            if proc.name() != "postgres":
                proc.send_signal(signal.SIGTERM)
            elif parent is None or parent.name() != "postgres":
                proc.send_signal(signal.SIGINT)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue


def pytest_sessionfinish(session: pytest.Session) -> None:
    problems = []
    # A server just stopped may still be reaping its workers: a few seconds' grace.
    _, alive = psutil.wait_procs(started_by_this_session(), timeout=5)
    if alive:
        problems.append("processes started by the tests outlived them (stopped now):\n  "
                        + "\n  ".join(_describe(p) for p in alive))
        stop_leftovers(alive)
    if _checkout_pg_before == [False] and (CHECKOUT_PG.exists() or CHECKOUT_PG.is_symlink()):
        problems.append(f"the tests created the checkout's own embedded cluster {CHECKOUT_PG} (removed now); "
                        "a test must use the tests' cluster (pg_cluster, link_test_cluster)")
        EmbeddedCluster(CHECKOUT_PG).remove()
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            if reporter is not None:
                reporter.write_sep("=", "left behind by the tests", red=True)
                reporter.write_line(problem)
            else:
                print(problem, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""Operator reads from a real streaming replica (pg_basebackup of the tests' cluster, started
here and stopped after): served by the replica, the primary within 2 s when it stops, the
primary while replay is paused past READ_MAX_LAG_S and the replica again after, and a device
enrolled a moment ago is authenticated at once (token look-ups never wait for the replica), and
the simulator's no-loss check reads the primary."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from array import array
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from config.settings import PROJECT_ROOT
from db.embedded import EmbeddedCluster
from db.reads import ReadRouter
from db.replica import ReplicaCluster
from simulator.server import AdminApi, verify_no_loss
from tests.conftest import ADMIN_KEY, link_test_cluster
from tests.support.helpers import heartbeat_body
from tests.support.live import LiveServer, call, start_server
from tests.support.metrics_scrape import scrape

MAX_LAG_S = 1.0
ADMIN = {"x-admin": ADMIN_KEY}


# VAR_DIR of `python -m db replica`, whose `pg` is the tests' cluster. Under var/: as root the
# cluster's system user must reach it, which pytest's 0700 tmp root forbids.
CLI_VAR_DIR = PROJECT_ROOT / "var" / "test-replica"


def db_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VAR_DIR=str(CLI_VAR_DIR))
    env.pop("DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "db", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def replica_started(pg_cluster: EmbeddedCluster, database_url: str) -> Iterator[tuple[ReplicaCluster, str]]:
    """A hot standby of the tests' cluster, made afresh by ``python -m db replica start`` for this
    module (with what it printed), and removed after."""
    cluster = ReplicaCluster(CLI_VAR_DIR / "pg-replica", primary=pg_cluster)
    cluster.remove()
    shutil.rmtree(CLI_VAR_DIR, ignore_errors=True)
    link_test_cluster(pg_cluster, CLI_VAR_DIR)
    started = db_cli("replica", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    cluster.port = int(cluster.port_file.read_text())
    yield cluster, started.stdout
    cluster.remove()
    shutil.rmtree(CLI_VAR_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def replica(replica_started: tuple[ReplicaCluster, str]) -> ReplicaCluster:
    return replica_started[0]


@pytest.fixture
def running_replica(replica: ReplicaCluster) -> ReplicaCluster:
    """The replica, running and replaying (a test before may have stopped or paused it)."""
    replica.start()
    if replica.psql("SELECT pg_is_wal_replay_paused()") == "t":
        replica.psql("SELECT pg_wal_replay_resume()")
    return replica


@pytest.fixture(scope="module")
def server(replica: ReplicaCluster, database_url: str, tmp_path_factory) -> Iterator[LiveServer]:
    """Both planes; the operator plane reads from the replica, bound READ_MAX_LAG_S = 1 s."""
    live = start_server(database_url, ADMIN_KEY, tmp_path_factory.mktemp("replica"), workers=1,
                        READ_DATABASE_URL=replica.url, READ_MAX_LAG_S=str(MAX_LAG_S), SCHEDULER_ENABLED="false")
    yield live
    live.stop()
    assert "Traceback" not in live.log(), live.log()[-3000:]


def enroll(server: LiveServer, n: int = 1) -> list[dict]:
    prefix = uuid.uuid4().hex[:10]
    status, body = call(server.admin_url + "/v1/devices/enroll", "POST",
                        {"devices": [{"device_uid": f"rep-{prefix}-{i}"} for i in range(n)]}, ADMIN)
    assert status == 201, body
    return body["devices"]


def heartbeat(server: LiveServer, device: dict, **fields) -> tuple[int, dict]:
    return call(server.url + "/v1/heartbeat", "POST", heartbeat_body(**fields),
                {"Authorization": f"Bearer {device['token']}"})


def later() -> datetime:
    """A send time two buckets ahead: a newer status than the one just sent."""
    return datetime.now(UTC) + timedelta(seconds=20)


def until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def status_of(server: LiveServer, device: dict) -> dict:
    code, body = call(f"{server.admin_url}/v1/devices/{device['id']}", headers=ADMIN)
    assert code == 200, body
    return body


def test_reads_are_served_by_the_replica(server, running_replica):
    device = enroll(server)[0]
    assert heartbeat(server, device, battery_pct=64)[0] == 200
    body = until(lambda: (b := status_of(server, device))["source"] == "replica" and b["battery_pct"] == 64 and b,
                 10, "the status from the replica")
    assert 0 <= body["replica_lag_s"] <= MAX_LAG_S
    for path, query in (("/v1/devices?limit=5", "list"), ("/v1/fleet/summary", "summary"),
                        (f"/v1/devices/{device['id']}/heartbeats", "history")):
        code, answer = call(server.admin_url + path, headers=ADMIN)
        assert code == 200 and answer["source"] == "replica", (query, answer)
    # The replica's lag is exported, and the guard measured it as fresh.
    m = scrape(server.admin_url, ADMIN_KEY)
    assert 0 <= m.value("nexmdm_replica_lag_seconds") <= MAX_LAG_S
    assert m.value("nexmdm_replica_up") == 1

    # Proof that the answer really is the replica's: with replay paused, a new value written to
    # the primary is not in it (while the lag is still within the bound).
    running_replica.psql("SELECT pg_wal_replay_pause()")
    try:
        assert heartbeat(server, device, battery_pct=12, sent_at=later())[0] == 200
        stale = status_of(server, device)
        if stale["source"] == "replica":  # within the bound: the replica's (old) view
            assert stale["battery_pct"] == 64
    finally:
        running_replica.psql("SELECT pg_wal_replay_resume()")
    fresh = until(lambda: (b := status_of(server, device))["source"] == "replica" and b["battery_pct"] == 12 and b,
                  10, "the replica catching up")
    assert fresh["battery_pct"] == 12


def test_replica_stopped_reads_answer_from_the_primary_within_2_s_without_5xx(server, running_replica):
    device = enroll(server)[0]
    assert heartbeat(server, device)[0] == 200
    until(lambda: status_of(server, device)["source"] == "replica", 10, "reads from the replica")
    answers: list[tuple[float, int, str | None]] = []
    done = threading.Event()

    def read_loop() -> None:
        while not done.is_set():
            code, body = call(f"{server.admin_url}/v1/devices/{device['id']}", headers=ADMIN)
            answers.append((time.monotonic(), code, body.get("source", body) if isinstance(body, dict) else None))
            time.sleep(0.02)

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        time.sleep(0.3)
        stopped_at = time.monotonic()
        running_replica.stop()
        time.sleep(2.5)
    finally:
        done.set()
        reader.join(timeout=10)
    after = [a for a in answers if a[0] > stopped_at]
    assert after and all(code == 200 for _, code, _ in answers), ([a for a in answers if a[1] != 200][:5],
                                                                  server.log()[-3000:])
    first_primary = next(t for t, _, source in after if source == "primary")
    assert first_primary - stopped_at < 2.0
    assert all(source == "primary" for t, _, source in after if t > first_primary)
    # Back: the guard finds it again and reads return to it.
    running_replica.start()
    until(lambda: status_of(server, device)["source"] == "replica", 10, "reads back on the replica")


def test_replay_paused_past_the_bound_reads_from_the_primary_then_the_replica_again(server, running_replica):
    device = enroll(server)[0]
    assert heartbeat(server, device, battery_pct=50)[0] == 200
    until(lambda: status_of(server, device)["source"] == "replica", 10, "reads from the replica")
    running_replica.psql("SELECT pg_wal_replay_pause()")
    try:
        assert heartbeat(server, device, battery_pct=49, sent_at=later())[0] == 200  # WAL the replica lacks
        body = until(lambda: (b := status_of(server, device))["source"] == "primary" and b,
                     MAX_LAG_S + 5, "reads to move to the primary")
        assert body["battery_pct"] == 49  # the primary's current value
        assert body["replica_lag_s"] is None or body["replica_lag_s"] > MAX_LAG_S
        # The exported lag is the last measurement's (at most a second old): over the bound too.
        until(lambda: scrape(server.admin_url, ADMIN_KEY).value("nexmdm_replica_lag_seconds") > MAX_LAG_S,
              3, "the exported lag above the bound")
    finally:
        running_replica.psql("SELECT pg_wal_replay_resume()")
    body = until(lambda: (b := status_of(server, device))["source"] == "replica" and b, 10, "reads back on the replica")
    assert body["battery_pct"] == 49 and body["replica_lag_s"] <= MAX_LAG_S


def test_a_device_enrolled_a_moment_ago_is_authenticated_at_once(server, running_replica):
    running_replica.psql("SELECT pg_wal_replay_pause()")  # the replica cannot know the new device
    try:
        device = enroll(server)[0]
        code, ack = heartbeat(server, device)
        assert code == 200 and ack["status"] == "stored", ack
        # Its status too: not on the replica yet, so the primary answers (not a 404).
        body = status_of(server, device)
        assert body["id"] == device["id"] and body["source"] == "primary"
    finally:
        running_replica.psql("SELECT pg_wal_replay_resume()")


def test_the_simulators_no_loss_check_reads_the_primary(running_replica, database_url, engine, tmp_path):
    """A replica seconds behind (replay paused; READ_MAX_LAG_S 60 keeps it in use) lacks the
    newest heartbeats: the simulator's no-loss check asks history for source=primary and finds
    every acknowledged one (it read whatever the operator plane chose, the replica here, and
    counted all three lost)."""
    live = start_server(database_url, ADMIN_KEY, tmp_path, workers=1, READ_DATABASE_URL=running_replica.url,
                        READ_MAX_LAG_S="60", SCHEDULER_ENABLED="false")
    try:
        device = enroll(live)[0]
        until(lambda: status_of(live, device)["source"] == "replica", 10, "reads from the replica")
        running_replica.psql("SELECT pg_wal_replay_pause()")
        try:
            acked = {device["id"]: array("q")}
            for ago_s in (20, 10, 0):
                code, ack = heartbeat(live, device, sent_at=datetime.now(UTC) - timedelta(seconds=ago_s))
                assert code == 200 and ack["status"] == "stored", ack
                acked[device["id"]].append(int(datetime.fromisoformat(ack["bucket_ts"]).timestamp()))
            history = f"{live.admin_url}/v1/devices/{device['id']}/heartbeats"
            code, body = call(history, headers=ADMIN)  # what the replica holds: none of them
            assert code == 200 and body["source"] == "replica" and body["heartbeats"] == [], body
            code, body = call(history + "?source=primary", headers=ADMIN)
            assert code == 200 and body["source"] == "primary" and len(body["heartbeats"]) == 3, body
            api = AdminApi(live.admin_url, ADMIN_KEY)
            try:
                result = verify_no_loss(api, acked, 0, io.StringIO(), show_progress=False)
            finally:
                api.close()
            assert (result["lost"], result["stored_rows"], result["errors"]) == (0, 3, 0), result
        finally:
            running_replica.psql("SELECT pg_wal_replay_resume()")
    finally:
        live.stop()


def test_lag_bound_from_samples_and_timestamps(engine, running_replica):
    """The guard's bound: 0 when caught up; with replay paused and the primary writing, at
    least the time since the pause; a measurement too old no longer vouches for the replica."""
    from config.settings import Settings
    from db.engine import make_engine

    skew = [0.0]
    replica_engine = make_engine(Settings(database_url=running_replica.url, db_pool_size=1, db_max_overflow=0))
    router = ReadRouter(engine, replica_engine, max_lag_s=MAX_LAG_S, clock=lambda: time.monotonic() + skew[0])
    try:
        assert not router.use_replica()  # not measured yet
        until(lambda: router.measure().lag_s == 0.0, 10, "caught up")
        assert router.use_replica()
        running_replica.psql("SELECT pg_wal_replay_pause()")
        paused = time.monotonic()
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO job_runs (job, started_at, status) VALUES ('reconcile', now(), 'skipped')"
            )
        router.measure()
        time.sleep(1.5)
        state = router.measure()
        assert state.reachable and time.monotonic() - paused + 1.0 >= state.lag_s >= 1.5, state
        assert not router.use_replica()
        running_replica.psql("SELECT pg_wal_replay_resume()")
        until(lambda: router.measure().lag_s == 0.0, 10, "caught up again")
        assert router.use_replica()
        skew[0] = MAX_LAG_S + 0.5  # a measurement this old no longer vouches for the replica
        assert not router.use_replica()
    finally:
        if running_replica.psql("SELECT pg_is_wal_replay_paused()") == "t":
            running_replica.psql("SELECT pg_wal_replay_resume()")
        replica_engine.dispose()


def test_db_replica_start_and_stop_make_a_streaming_replica_in_one_command(replica_started, pg_cluster):
    """``python -m db replica start`` (run by the fixture) made a streaming hot standby and said
    how to use it; a second start is harmless; ``stop`` stops it."""
    replica, printed = replica_started
    replica.start()
    assert replica.url in printed and f"READ_DATABASE_URL={replica.url}" in printed
    assert replica.is_standby()
    assert int(pg_cluster.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")) >= 1
    again = db_cli("replica", "start")
    assert again.returncode == 0 and replica.url in again.stdout, again.stdout + again.stderr
    stopped = db_cli("replica", "stop")
    assert stopped.returncode == 0 and not replica.running(), stopped.stdout + stopped.stderr


def test_the_replica_follows_the_embedded_primary_to_its_new_port(tmp_path):
    """The embedded primary may restart on another port: starting the replica again aims its
    primary_conninfo there (and keeps the rest of its settings)."""
    primary = EmbeddedCluster(tmp_path / "pg")
    primary.port_file.write_text("6543\n")
    copy = ReplicaCluster(tmp_path / "pg-replica", primary=primary)
    copy.data_dir.mkdir()
    conf = copy.data_dir / "postgresql.auto.conf"
    conf.write_text("max_connections = '600'\n"
                    "primary_conninfo = 'user=postgres host=127.0.0.1 port=5999 sslmode=disable'\n")
    assert copy.point_at_primary()
    text = conf.read_text()
    assert "host=127.0.0.1 port=6543 sslmode" in text and "port=5999" not in text
    assert text.startswith("max_connections = '600'\n")
    assert not copy.point_at_primary()  # already aimed there

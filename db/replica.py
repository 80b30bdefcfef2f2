"""A local streaming replica of the embedded primary (``python -m db replica start|stop``).

``pg_basebackup`` (shipped by the pip package with the other binaries) copies the running
primary into ``var/pg-replica`` and writes ``standby.signal`` and ``primary_conninfo`` (its
``-R``), so the copy starts as a hot standby that streams the primary's WAL and answers reads.
It listens on 127.0.0.1 on a port of its own; point READ_DATABASE_URL at its URL.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

from config.settings import Settings
from db.embedded import EmbeddedCluster, EmbeddedError, write_private
from db.engine import embedded_cluster


@dataclass
class ReplicaCluster(EmbeddedCluster):
    """A hot standby of ``primary``, created from it with pg_basebackup on first start."""

    primary: EmbeddedCluster | None = None

    def init(self) -> None:
        """Copy the primary (which must be running) into ``data_dir``, unless already done."""
        self.prepare()
        if self.initialized():
            return
        if self.primary is None:
            raise EmbeddedError("a replica needs its primary")
        if self.primary.port is None and self.primary.port_file.exists():
            self.primary.port = int(self.primary.port_file.read_text().strip())
        if not (self.primary.initialized() and self.primary.running()):
            raise EmbeddedError(f"the primary in {self.primary.data_dir} is not running (start it first)")
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)  # a half-made copy from a failed attempt
        self.data_dir.mkdir(parents=True)
        self.data_dir.chmod(0o700)
        if self.run_as:
            os.chown(self.data_dir, self.run_as.pw_uid, self.run_as.pw_gid)
        # A copy of the primary: the same roles, so the same password (var/<name>.password, 600);
        # pg_basebackup takes it from the environment and writes it into primary_conninfo.
        write_private(self.password_file, self.primary.password + "\n")
        result = self._run(
            "pg_basebackup", "-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.primary.port),
            "-U", "postgres", "--write-recovery-conf", "--wal-method=stream", "--checkpoint=fast",
            "--no-password", check=False, timeout=600, env={"PGPASSWORD": self.primary.password},
        )
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise EmbeddedError(f"pg_basebackup failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> str:
        """Start it (copying the primary on first use), streaming from the primary's current port."""
        self.init()
        self.point_at_primary()
        return super().start()

    def point_at_primary(self) -> bool:
        """Aim primary_conninfo at the primary's port of now (the embedded primary may have
        restarted on another one); reloads a running replica. True when it changed."""
        if self.primary is None or not self.primary.port_file.exists():
            return False
        port = self.primary.port_file.read_text().strip()
        conf = self.data_dir / "postgresql.auto.conf"
        lines = conf.read_text().splitlines(keepends=True)
        changed = False
        for i, line in enumerate(lines):
            if line.startswith("primary_conninfo") and f" port={port} " not in line:
                lines[i] = re.sub(r"\bport=\d+", f"port={port}", line)
                changed = True
        if changed:
            conf.write_text("".join(lines))  # in place: the file keeps its owner
            if self.running():
                self._run("pg_ctl", "reload", "-D", str(self.data_dir), check=False)
        return changed

    def is_standby(self) -> bool:
        """True when the running cluster is in recovery (a standby), as it must be."""
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    def remove(self) -> None:
        """Stop it and delete its data (the next start copies the primary afresh)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.port_file.unlink(missing_ok=True)


def local_replica(settings: Settings) -> ReplicaCluster:
    """The local replica of this checkout's embedded primary (``var/pg-replica``)."""
    return ReplicaCluster(settings.var_dir / "pg-replica", primary=embedded_cluster(settings))

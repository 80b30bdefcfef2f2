"""RUNBOOK.md (the job sections): every command that can run here runs, as written, and succeeds.

Shell commands (```sh blocks, and inline `.venv/bin/python ...` spans) run from the checkout
with DATABASE_URL and ARCHIVE_DIR pointing at the test database and a temporary directory; curl
commands go to a live server instead of 127.0.0.1:8000. SQL blocks run against the test
database. The example day 2026-08-01 is replaced by a real old day that the runbook's own
`run nightly` archives and its `restore` brings back. Commands with a <placeholder> (other
than <id>) and the foreground scheduler are left out.
"""

from __future__ import annotations

import os
import re
import subprocess
from datetime import UTC, datetime, timedelta

import psycopg2

from config.settings import PROJECT_ROOT
from db.partitions import partition_name
from tests.conftest import ADMIN_KEY, link_test_cluster
from tests.support.jobdata import fill_day, make_devices, scalar
from tests.support.live import start_server

RUNBOOK = PROJECT_ROOT / "RUNBOOK.md"
FIRST_SECTION = "## Scheduled jobs"  # the sections from here on (jobs, partitions, archives, pool)
_BLOCK = re.compile(r"```(sh|sql)\n(.*?)```", re.S)
_INLINE = re.compile(r"`((?:[A-Z_]+=\S+ )?\.venv/bin/python -m [^`]+)`")
_INLINE_CURL = re.compile(r"`(curl [^`]+)`")
# Commands that run until stopped (a scheduler process, the console, a server, a load run):
# other tests cover them; here they would only hang.
_INTERACTIVE = re.compile(r"-m scheduler\s*$|-m console|make (run|console)|-m api serve|-m simulator ")


def runbook_steps() -> list[tuple[str, str]]:
    """(kind, text) in document order: ('sh', command) or ('sql', statements)."""
    text = RUNBOOK.read_text()
    text = text[text.index(FIRST_SECTION):]
    found: list[tuple[int, str, str]] = []
    for m in _BLOCK.finditer(text):
        if m.group(1) == "sql":
            found.append((m.start(), "sql", m.group(2)))
        else:
            found += [(m.start() + i, "sh", line) for i, line in enumerate(m.group(2).splitlines()) if line.strip()]
    blocks = [(m.start(), m.end()) for m in _BLOCK.finditer(text)]
    for pattern in (_INLINE, _INLINE_CURL):
        for m in pattern.finditer(text):
            if not any(a <= m.start() < b for a, b in blocks):
                found.append((m.start(), "sh", m.group(1)))
    steps: list[tuple[str, str]] = []
    for _, kind, body in sorted(found):
        if (kind, body) in steps:  # a command the runbook repeats is run once
            continue
        if kind == "sh" and (re.search(r"<(?!id>)[a-z]+>", body) or _INTERACTIVE.search(body)):
            continue
        steps.append((kind, body))
    return steps


def test_runbook_commands_work_as_written(engine, database_url, pg_cluster, tmp_path):
    devices = make_devices(engine, 2)
    old = datetime.now(UTC).date() - timedelta(days=30)  # past HOT_DAYS (14), inside RETENTION_DAYS (90)
    fill_day(engine, old, devices)
    archive_dir = tmp_path / "archive"
    server = start_server(database_url, ADMIN_KEY, tmp_path, workers=1)
    # VAR_DIR's embedded cluster is the tests' own: `python -m db start` finds it running and
    # starts nothing (with the checkout's var/ it started var/pg, which outlived the tests; the
    # session-end check in tests/conftest.py now fails a run that leaves one).
    var_dir = link_test_cluster(pg_cluster, tmp_path / "var")
    env = dict(os.environ, DATABASE_URL=database_url, ARCHIVE_DIR=str(archive_dir), KEY=ADMIN_KEY,
               VAR_DIR=str(var_dir))
    host = server.url.removeprefix("http://")
    admin_host = server.admin_url.removeprefix("http://")

    def localise(text: str) -> str:
        return (text.replace("20260801", f"{old:%Y%m%d}").replace("2026-08-01", old.isoformat())
                .replace("2026-08-02", (old + timedelta(days=1)).isoformat())
                .replace("var/archive/", f"{archive_dir}/").replace("127.0.0.1:8000", host)
                .replace("127.0.0.1:8001", admin_host)
                .replace("<id>", str(devices[0])))

    steps = runbook_steps()
    ran = {"sh": 0, "sql": 0}
    try:
        for kind, body in steps:
            body = localise(body)
            if kind == "sql":
                with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
                    for statement in filter(str.strip, body.split(";")):
                        cur.execute(statement)
                ran["sql"] += 1
                continue
            out = subprocess.run(["bash", "-c", body], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, f"{body}\n{out.stdout}\n{out.stderr}"
            if body.startswith("curl"):
                assert '"error":"' not in out.stdout, f"{body}\n{out.stdout}"
                if "/heartbeats?" in body:
                    assert out.stdout.count('"bucket_ts"') == 3, out.stdout
            ran["sh"] += 1
    finally:
        server.stop()
    assert ran["sh"] >= 14 and ran["sql"] >= 5, ran
    state = scalar(engine, "SELECT state FROM hb_partitions WHERE name = %(n)s", {"n": partition_name(old)})
    assert state == "restored"

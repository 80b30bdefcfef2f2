"""The session-end check of tests/conftest.py: a pytest run whose test leaves a process running
(or creates the checkout's var/pg) fails, names it, and stops (removes) what was left."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from tests.conftest import CHECKOUT_PG

ROOT = Path(__file__).resolve().parents[2]


def test_a_process_left_running_or_a_checkout_cluster_fails_the_session(tmp_path):
    make_checkout_pg = not (CHECKOUT_PG.exists() or CHECKOUT_PG.is_symlink())  # never touch a developer's
    pid_file = tmp_path / "leaked.pid"
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path

        def test_leaves_things_behind():
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
            Path({str(pid_file)!r}).write_text(str(proc.pid))
            if {make_checkout_pg!r}:
                Path({str(CHECKOUT_PG)!r}).mkdir(parents=True)
    """))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                          str(tmp_path / "test_leaky.py")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 1 and "1 passed" in out, out[-3000:]  # the test passed; the session did not
    leaked = int(pid_file.read_text())
    assert "outlived them" in out and f"pid {leaked} " in out, out[-3000:]
    assert not psutil.pid_exists(leaked) or psutil.Process(leaked).status() == psutil.STATUS_ZOMBIE
    if make_checkout_pg:
        assert "created the checkout's own embedded cluster" in out, out[-3000:]
        assert not CHECKOUT_PG.exists()

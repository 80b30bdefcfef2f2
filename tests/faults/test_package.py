"""``pip install .`` into a fresh virtualenv: the runtime requirements only, the ``nexmdm``
command serves, and Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops
it cleanly, without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from config.settings import PROJECT_ROOT
from tests.conftest import ADMIN_KEY
from tests.live import free_port

pytestmark = pytest.mark.slow


def test_pip_install_into_a_fresh_virtualenv_serves_and_stops_cleanly(database_url, engine, tmp_path: Path):
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=PROJECT_ROOT, capture_output=True, check=False)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    source = tmp_path / "source"  # a copy: pip's build directories stay out of the checkout
    for name in tracked.stdout.decode().split("\0"):
        if name and not name.startswith("tests/") and (PROJECT_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(source)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert pip.returncode == 0, pip.stderr[-3000:]
    # Runtime only: no test or lint tool came with it.
    probe = "import importlib.util as u; print([m for m in ('pytest', 'ruff', 'hypothesis', 'schemathesis', 'yaml') " \
            "if u.find_spec(m)])"
    found = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                           cwd=tmp_path, check=True).stdout.strip()
    assert found == "[]", found

    port, admin_port = free_port(), free_port()
    workdir = tmp_path / "run"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(DATABASE_URL=database_url, ADMIN_KEY=ADMIN_KEY, PORT=str(port), ADMIN_PORT=str(admin_port),
               SCHEDULER_ENABLED="false", WEB_CONCURRENCY="2")
    out = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([str(venv / "bin" / "nexmdm"), "serve"], cwd=workdir, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with (urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as device,
                      urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as operator):
                    if device.status == operator.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.3)
        req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/fleet/summary", headers={"x-admin": ADMIN_KEY})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert "total" in json.loads(resp.read())
        assert (workdir / "var" / "prometheus").is_dir()  # var/ of where it runs, not site-packages
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert code in (0, 130), (code, log[-2000:])

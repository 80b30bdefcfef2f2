"""The package as a production host installs it (``pip install .``) into a fresh virtualenv: its
wheel built from the tracked files as pip builds it (isolated, pyproject.toml's build system),
the dependencies pip resolves from that wheel's metadata: the runtime requirements only; the
``nexmdm`` command serves, and Ctrl-C (SIGINT to the whole process group, as a terminal sends
it) stops it cleanly, without a traceback.

pip resolves the dependencies for real (``--dry-run --report``, into the new virtualenv). They are
then linked from this environment, which ``make`` built from the same pinned releases, instead of
being unpacked again (300 MB: 80-140 s of pip in make test-faults): the virtualenv holds exactly
the distributions pip chose, at the versions it chose, and nothing else."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
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
from tests.support.live import free_port

pytestmark = pytest.mark.slow

DEV_TOOLS = {"pytest", "ruff", "hypothesis", "schemathesis", "pyyaml"}


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """This environment's pip (the target virtualenv named with --python where it matters)."""
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def link_distributions(site_packages: Path, wanted: dict[str, str]) -> None:
    """Link each distribution of ``wanted`` (canonical name -> version) from this environment
    into ``site_packages``: its top-level packages, modules, metadata and bundled libraries."""
    have = {canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    missing = sorted(set(wanted) - set(have))
    assert not missing, f"pip resolved {missing}, which this environment lacks: make venv"
    for name, version in wanted.items():
        dist = have[name]
        assert dist.version == version, f"{name}: pip resolved {version}, this environment has {dist.version}"
        assert dist.files, f"{name} lists no files (no RECORD)"
        for top in sorted({f.parts[0] for f in dist.files} - {"..", "__pycache__"}):
            target = site_packages / top
            if not target.exists():
                target.symlink_to(Path(dist.locate_file(top)).resolve())


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
    built = pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path / "wheels"), str(source))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("nexmdm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"

    # What `pip install .` would install: the package and the dependencies its metadata names.
    report_path = tmp_path / "resolved.json"
    resolved = pip("--python", str(python), "install", "--quiet", "--dry-run", "--ignore-installed",
                   "--report", str(report_path), str(wheel))
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    chosen = {canonical(item["metadata"]["name"]): item["metadata"]["version"]
              for item in json.loads(report_path.read_text())["install"]}
    assert chosen.pop("nexmdm", None), chosen  # the package itself, from its wheel
    assert not DEV_TOOLS & set(chosen), DEV_TOOLS & set(chosen)  # runtime requirements only
    assert {"flask", "gunicorn", "gevent", "sqlalchemy", "psycopg2-binary"} <= set(chosen), chosen
    installed = pip("--python", str(python), "install", "--quiet", "--no-deps", "--no-compile", str(wheel))
    assert installed.returncode == 0, installed.stderr[-3000:]
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True).stdout.strip())
    link_distributions(site_packages, chosen)
    # Runtime only: no test or lint tool is importable in it.
    probe = "import importlib.util as u; print([m for m in ('pytest', 'ruff', 'hypothesis', 'schemathesis', 'yaml') " \
            "if u.find_spec(m)])"
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
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

"""The development admin key: generated once under var/, never one a command line would take
for an option."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

from config import admin_key
from config.settings import Settings
from tests.support.live import ROOT


def test_a_generated_key_never_begins_with_a_dash(monkeypatch, tmp_path: Path) -> None:
    drawn = iter(["-starts-with-a-dash", "Ok-key"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda _n: next(drawn))
    key, from_file = admin_key.ensure_admin_key(Settings(var_dir=tmp_path))
    assert (key, from_file) == ("Ok-key", True)
    assert admin_key.admin_key_path(Settings(var_dir=tmp_path)).read_text() == "Ok-key\n"
    assert admin_key.ensure_admin_key(Settings(var_dir=tmp_path)) == ("Ok-key", True)  # kept


def test_a_key_that_begins_with_a_dash_passes_as_admin_key_equals() -> None:
    """How the bench, the drills and the console pass a key to the simulator: an operator's own
    key may begin with a dash (on 2026-12-01 one bench run lost its (c) run to such a key)."""
    out = subprocess.run([sys.executable, "-m", "simulator", "--devices", "1", "--duration", "1", "--dry-run",
                          "--admin-key=-abc"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "expected one argument" not in out.stderr, out.stderr
    spaced = subprocess.run([sys.executable, "-m", "simulator", "--devices", "1", "--duration", "1", "--dry-run",
                             "--admin-key", "-abc"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "expected one argument" in spaced.stderr

"""The operator key: ADMIN_KEY, or in development one generated once under var/."""

from __future__ import annotations

import secrets
from pathlib import Path

from config.settings import Settings


def admin_key_path(settings: Settings) -> Path:
    """Where the development admin key is kept."""
    return settings.var_dir / "admin_key"


def new_key() -> str:
    """A random key (256 bits, URL-safe) that does not begin with "-": one that did would be
    read as an option where it follows ``--admin-key`` on a command line (one key in 64 did)."""
    while True:
        key = secrets.token_urlsafe(32)
        if not key.startswith("-"):
            return key


def ensure_admin_key(settings: Settings) -> tuple[str, bool]:
    """The admin key and whether it came from a file under var/ (created if missing, mode 600)."""
    if settings.admin_key:
        return settings.admin_key, False
    path = admin_key_path(settings)
    if path.exists():
        return path.read_text().strip(), True
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key, True

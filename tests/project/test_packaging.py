"""The package: runtime requirements apart from the development tools, a console script for
every tool, and logs a shipper can read (LOG_FORMAT=json) without APScheduler's chatter."""

from __future__ import annotations

import io
import json
import logging
import tomllib

import pytest

import nexmdm_cli
from config.logs import configure_logging
from config.settings import PROJECT_ROOT, Settings

DEV_TOOLS = {"pytest", "pytest-textual-snapshot", "ruff", "hypothesis", "schemathesis", "pyyaml"}


def requirement_names(path: str) -> set[str]:
    names = set()
    for line in (PROJECT_ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(line.split("==")[0].strip().lower())
    return names


def test_runtime_requirements_hold_no_development_tool():
    runtime = requirement_names("requirements.txt")
    assert runtime and not runtime & DEV_TOOLS, runtime & DEV_TOOLS
    assert DEV_TOOLS <= requirement_names("requirements-dev.txt")
    assert "-r requirements.txt" in (PROJECT_ROOT / "requirements-dev.txt").read_text()
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert project["project"]["scripts"]["nexmdm"] == "nexmdm_cli:main"


def test_every_tool_is_a_subcommand(capsys):
    assert set(nexmdm_cli.COMMANDS) == {"serve", "keys", "db", "scheduler", "simulate", "console"}
    with pytest.raises(SystemExit) as exc:
        nexmdm_cli.main(["db", "--help"])
    assert exc.value.code == 0
    assert "python -m db" in capsys.readouterr().out
    assert nexmdm_cli.main(["nonsense"]) == 2


def test_json_logs_and_no_apscheduler_chatter():
    root = logging.getLogger()
    saved = (root.level, [(h, h.formatter) for h in root.handlers])
    try:
        configure_logging(Settings(log_format="json", log_level="INFO"))
        stream = io.StringIO()
        ours = next(h for h in root.handlers if getattr(h, "_nexmdm", False))
        ours.setStream(stream)
        logging.getLogger("nexmdm.test").info("stored %d heartbeats", 3)
        logging.getLogger("apscheduler.executors.default").info('Running job "partitions"')
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        got = [(e["level"], e["logger"], e["message"]) for e in lines]
        assert got == [("INFO", "nexmdm.test", "stored 3 heartbeats")]
        assert lines[0]["ts"].endswith("+00:00")
        configure_logging(Settings(log_format="text", log_level="DEBUG"))
        logging.getLogger("apscheduler.executors.default").info('Running job "partitions"')
        assert 'Running job "partitions"' in stream.getvalue().splitlines()[-1]
    finally:
        root.setLevel(saved[0])
        for handler in list(root.handlers):
            if getattr(handler, "_nexmdm", False):
                root.removeHandler(handler)
        logging.getLogger("apscheduler").setLevel(logging.NOTSET)

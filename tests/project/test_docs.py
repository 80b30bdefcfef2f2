"""The docs say what the code does: every setting is in the README's settings table, every
metric the docs name is one the server exports, and every make target the README names exists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from config.settings import PROJECT_ROOT, Settings
from db.heartbeats import PREPARED_NAME

# Where metric names are written for people (the alert rules and the dashboard are checked
# against a live server's scrape in test_monitoring.py).
METRIC_DOCS = ("README.md", "RUNBOOK.md", "docs/SCALING.md", "simulator/README.md")
# nexmdm_ names that are no metric: the heartbeat insert's prepared statement.
NOT_METRICS = {PREPARED_NAME}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
# Every metric family api/metrics.py registers, in a process of its own (no multiprocess
# directory); the replica's gauges appear with its first lag measurement.
_EXPORTED = """
import json, types, prometheus_client
from api import metrics
replica = metrics.ReplicaGauges()
replica.observe(types.SimpleNamespace(reachable=False, lag_s=None))
families = [*prometheus_client.REGISTRY.collect(), *replica.registry.collect()]
print(json.dumps(sorted((m.name, m.type) for m in families)))
"""


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_every_setting_is_in_the_readme_settings_table():
    table = _section((PROJECT_ROOT / "README.md").read_text(), "Settings")
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    settings = {f.name.upper() for f in fields(Settings)}
    assert settings - named == set(), "settings missing from README's table"
    assert named - settings == set(), "README's table names settings the code does not have"


@pytest.fixture(scope="module")
def exported() -> set[str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", _EXPORTED], cwd=PROJECT_ROOT, env=env, capture_output=True,
                         text=True, check=True)
    names: set[str] = set()
    for name, kind in json.loads(out.stdout):
        names.add(name)
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ()))
    return names


def test_the_exported_names_are_read_right(exported):
    assert {"nexmdm_heartbeat_write_duration_seconds_bucket", "nexmdm_heartbeats_accepted_total",
            "nexmdm_replica_up"} <= exported
    assert "nexmdm_heartbeat_write_seconds" not in exported  # the name README once gave


@pytest.mark.parametrize("doc", METRIC_DOCS)
def test_every_metric_the_docs_name_is_exported(doc, exported):
    text = (PROJECT_ROOT / doc).read_text()
    assert _metric_names(text) - exported == set(), f"{doc} names metrics the server does not export"


def _metric_names(text: str) -> set[str]:
    # "nexmdm_heartbeat*" names a family; a path ("/etc/prometheus/nexmdm_admin_key") is no metric.
    return set(re.findall(r"(?<![/\w])(nexmdm_[a-z0-9_]+)(?![\w*])", text)) - NOT_METRICS


def test_the_docs_pattern_finds_the_names():
    found = _metric_names("`nexmdm_heartbeats_rejected_total{reason}` and nexmdm_replica_up; "
                          "/etc/prometheus/nexmdm_admin_key, nexmdm_heartbeat*, " + PREPARED_NAME)
    assert found == {"nexmdm_heartbeats_rejected_total", "nexmdm_replica_up"}


def _make_targets(makefile: Path) -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*)\s*:(?!=)", makefile.read_text(), re.MULTILINE))


def test_every_make_target_the_readme_names_exists():
    named = set(re.findall(r"`make ([a-z][a-z0-9-]*)", (PROJECT_ROOT / "README.md").read_text()))
    named |= set(re.findall(r"^make ([a-z][a-z0-9-]*)", (PROJECT_ROOT / "README.md").read_text(), re.MULTILINE))
    assert {"run", "test", "test-faults", "bench"} <= named
    assert named - _make_targets(PROJECT_ROOT / "Makefile") == set()

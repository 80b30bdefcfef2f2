"""One home for each concern, checked on the source: job_runs statements in
db/job_runs.py only, one partition-DDL lock helper, routes that borrow nothing from a sibling
route and nothing from the scheduler but its public entry point (run_job)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = [p for package in ("api", "db", "scheduler", "bench", "console", "simulator")
        for p in sorted((ROOT / package).rglob("*.py"))]
ROUTES = sorted((ROOT / "api" / "routes").glob("*.py"))
# A string of SQL (a statement keyword in capitals) that names the table; not prose about it.
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def _job_runs_statements(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and "job_runs" in node.value and SQL.search(node.value)]


def test_every_job_runs_statement_is_in_db_job_runs():
    places = [place for p in CODE for place in _job_runs_statements(p)]
    assert len(places) >= 7 and {place.split(":")[0] for place in places} == {"db/job_runs.py"}, places


def test_the_partition_ddl_lock_is_named_once():
    places = [f"{p.relative_to(ROOT)}:{n}" for p in CODE for n, line in enumerate(p.read_text().splitlines(), 1)
              if "partitions:ddl" in line]
    assert places == ["db/partitions.py:" + places[0].split(":")[1]] and len(places) == 1, places


def test_no_route_module_imports_from_a_sibling_route_module():
    borrowed = [(p.name, module, names) for p in ROUTES for module, names in _imports(p)
                if module.startswith("api.routes")]
    assert borrowed == []


def test_routes_reach_the_scheduler_only_through_run_job():
    reached = [(p.name, module, names) for p in ROUTES for module, names in _imports(p)
               if module.startswith("scheduler") and (module, names) != ("scheduler.service", ["run_job"])]
    assert reached == []

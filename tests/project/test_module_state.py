"""Nothing changes a module's tables at import time, and no module keeps app state of its own:
what an app needs lives in its AppState, what a document lists is written down, and importing a
module twice or in another order changes neither."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_route_modules_changes_no_openapi_table():
    """The route modules used to append their operations to api.openapi.OPERATIONS when first
    imported (register()), so the document depended on what had been imported before it."""
    script = (
        "import api.openapi as o\n"
        "before = len(o.OPERATIONS)\n"
        "import api.planes\n"
        "api.planes.blueprints()\n"  # imports every route module
        "print(before, len(o.OPERATIONS), flush=True)\n"
        "print(len(o.operations()))\n"
        "paths = o.build_document()['paths']\n"
        "print(sorted(p for p in paths if p.startswith(('/v1/keys', '/v1/audit', '/metrics', '/ops/pool'))))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = run.stdout.splitlines()
    before, after = map(int, out[0].split())
    assert before == after, "importing a route module changed api.openapi.OPERATIONS"
    assert run.returncode == 0, run.stderr
    assert int(out[1]) == before + 6  # audit 1, keys 3, observability 2: gathered by operations()
    assert out[2] == str(["/metrics", "/ops/pool_health", "/v1/audit", "/v1/keys", "/v1/keys/{key_id}/revoke"])


MUTATORS = {"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem", "clear", "remove",
            "discard"}


def _module_state_changed_at_run_time(path: Path) -> list[str]:
    """Module globals that a function changes: rebound (``global``), a container of the module
    changed in place (``NAME.append(...)``, ``NAME[k] = v``, ``del NAME[k]``)."""
    tree = ast.parse(path.read_text())
    module_names = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)}
    where = str(path.relative_to(ROOT))
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        local = {a.arg for a in func.args.args + func.args.kwonlyargs}
        local |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(func):
            if isinstance(node, ast.Global):
                found += [f"{where}: global {name}" for name in node.names]
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                target = node.func.value
            elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
                target = node.value
            if isinstance(target, ast.Name) and target.id in module_names and target.id not in local:
                found.append(f"{where}:{node.lineno} {target.id}")
    return found


def test_no_module_of_the_server_keeps_mutable_state_of_its_own():
    """scheduler.locking._listeners, api.metrics._last_success_s, _replica_gauges and _plane were
    shared by every app of the process; they belong to the app (AppState) or its objects now."""
    modules = [p for package in ("api", "db", "scheduler", "config") for p in sorted((ROOT / package).rglob("*.py"))]
    assert modules
    assert [name for path in modules for name in _module_state_changed_at_run_time(path)] == []

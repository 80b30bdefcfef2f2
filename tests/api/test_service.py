"""Health, readiness, the OpenAPI document, migrations and start-up partitions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from api.schemas import HeartbeatIn
from db.partitions import list_partitions, partition_name


def test_health_and_ready(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ok", "database": "ok"}


def test_openapi_lists_every_route_with_generated_schemas(client, app):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<int:", "{").replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (path, method)
    schema = doc["components"]["schemas"]["HeartbeatIn"]
    assert set(schema["required"]) == set(HeartbeatIn.__struct_fields__) - {"signal_dbm"}
    assert schema["properties"]["battery_pct"]["maximum"] == 100


def test_partitions_for_today_and_next_seven_days_exist(engine):
    today = datetime.now(UTC).date()
    with engine.connect() as conn:
        names = list_partitions(conn)
        recorded = {r[0] for r in conn.exec_driver_sql("SELECT name FROM hb_partitions WHERE state = 'active'")}
    wanted = {partition_name(today + timedelta(days=d)) for d in range(8)}
    assert wanted <= names and wanted <= recorded

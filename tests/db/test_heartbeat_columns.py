"""The heartbeat's columns are defined once (db.heartbeats.HeartbeatRow); everything that lists
them again must agree, so adding a field fails here until it is added everywhere it must be."""

from __future__ import annotations

import msgspec

from api.heartbeat_parsing import _REPORTED_AS_IS
from api.schemas import DeviceStatus, HeartbeatIn, HeartbeatRecord
from db.heartbeats import COLUMNS, STATUS_COLUMNS, HeartbeatRow
from db.models import DeviceLastStatus, Heartbeat


def test_the_models_have_the_rows_columns():
    assert [c.name for c in Heartbeat.__table__.columns] == [*COLUMNS, "extra"]
    assert [c.name for c in DeviceLastStatus.__table__.columns] == list(STATUS_COLUMNS)
    assert [c.name for c in Heartbeat.__table__.primary_key] == ["device_id", "bucket_ts"]


def test_every_reported_field_is_stored_as_sent():
    assert set(_REPORTED_AS_IS) <= set(COLUMNS)
    assert set(HeartbeatIn.__struct_fields__) == {"sent_at", *_REPORTED_AS_IS}


def test_the_read_schemas_have_every_column():
    assert set(HeartbeatRecord.__struct_fields__) == {*COLUMNS, "extra"}
    status = set(DeviceStatus.__struct_fields__)
    assert {c for c in STATUS_COLUMNS if c not in ("device_id", "received_at")} <= status
    assert "last_seen_at" in status


def test_a_row_encodes_to_the_columns_it_is_stored_in():
    row = msgspec.json.decode(msgspec.json.encode(HeartbeatRow(
        1, *["2026-01-01T00:00:00Z"] * 3, 0.0, 5, False, "wifi", None, "1", "14", 1, 2,
        extra_json=msgspec.Raw(b'{"a":1}'),
    )))
    assert list(row) == [*COLUMNS, "extra"] and row["extra"] == {"a": 1}

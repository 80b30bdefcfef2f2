"""Webhook signatures and retry timing, without a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from config.settings import Settings
from scheduler.jobs.webhooks import backoff_s, next_attempt_at, sign, verify

SECRET = "whsec_0123456789abcdef"
BODY = b'{"events":[]}'
# printf '1700000000.{"events":[]}' | openssl dgst -sha256 -hmac 'whsec_0123456789abcdef'
OPENSSL = "v1=473a4242de662e4ffdbf788af4dc5863afc5ecc969d6d7fd36377e754b00d93e"


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    assert sign(SECRET, 1_700_000_000, BODY) == OPENSSL


def test_receiver_check_refuses_a_changed_body_another_secret_and_an_old_timestamp():
    assert verify(SECRET, "1700000000", OPENSSL, BODY, now_s=1_700_000_100)
    assert not verify(SECRET, "1700000000", OPENSSL, BODY + b" ", now_s=1_700_000_100)
    assert not verify("whsec_another-secret", "1700000000", OPENSSL, BODY, now_s=1_700_000_100)
    assert not verify(SECRET, "1700000001", OPENSSL, BODY, now_s=1_700_000_100)  # timestamp is signed
    assert not verify(SECRET, "1700000000", OPENSSL, BODY, now_s=1_700_000_000 + 301)  # replayed later
    assert not verify(SECRET, "yesterday", OPENSSL, BODY, now_s=1_700_000_100)


def test_backoff_doubles_up_to_its_cap_and_retries_stop_a_day_after_the_batch():
    assert [backoff_s(n, 1.0, 3600.0) for n in (1, 2, 3, 4, 12, 13, 100)] == [1, 2, 4, 8, 2048, 3600, 3600]
    settings = Settings(database_url="unused")
    made = datetime(2026, 12, 1, tzinfo=UTC)
    assert next_attempt_at(made, 1, made, settings) == made + timedelta(seconds=1)
    late = made + timedelta(hours=23, minutes=50)
    assert next_attempt_at(made, 30, late, settings) == made + timedelta(days=1)  # the last try, at 24 h
    assert next_attempt_at(made, 31, made + timedelta(days=1), settings) is None

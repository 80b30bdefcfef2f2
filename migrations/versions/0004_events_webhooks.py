"""Events (partitioned by day), the per-device state they are derived from, webhooks and their
deliveries.

The state table is filled from the fleet as it is now, so installing this does not report every
device already online as having just come online; devices enrolled later start "never seen".

Revision ID: 0004_events_webhooks
Revises: 0003
"""

from alembic import op

revision = "0004_events_webhooks"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE device_event_state (
            device_id    bigint PRIMARY KEY,
            online       boolean,
            battery_band text CHECK (battery_band IN ('ok', 'low', 'critical')),
            app_version  text,
            revoked      boolean NOT NULL DEFAULT false,
            changed_at   timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE events (
            id          bigserial,
            occurred_at timestamptz NOT NULL,
            type        text NOT NULL CHECK (type IN ('device_offline', 'device_online', 'battery_low',
                                                      'battery_critical', 'app_version_changed',
                                                      'token_revoked')),
            device_id   bigint NOT NULL,
            detail      jsonb NOT NULL DEFAULT '{}',
            PRIMARY KEY (device_id, id, occurred_at)
        ) PARTITION BY RANGE (occurred_at);
        CREATE INDEX ix_events_id ON events (id);
        CREATE INDEX ix_events_type_id ON events (type, id);

        CREATE TABLE webhooks (
            id              bigserial PRIMARY KEY,
            url             text NOT NULL,
            event_types     text[] NOT NULL DEFAULT '{}',
            secret          text NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now(),
            deleted_at      timestamptz,
            cursor_event_id bigint NOT NULL DEFAULT 0,
            lease_owner     text,
            lease_until     timestamptz
        );

        CREATE TABLE webhook_deliveries (
            id               bigserial PRIMARY KEY,
            webhook_id       bigint NOT NULL REFERENCES webhooks (id),
            idempotency_key  uuid NOT NULL UNIQUE,
            first_event_id   bigint NOT NULL,
            last_event_id    bigint NOT NULL,
            event_count      integer NOT NULL,
            body             text NOT NULL,
            status           text NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled')),
            attempts         integer NOT NULL DEFAULT 0,
            created_at       timestamptz NOT NULL,
            next_attempt_at  timestamptz NOT NULL,
            last_attempt_at  timestamptz,
            delivered_at     timestamptz,
            last_status_code integer,
            last_error       text,
            attempt_log      jsonb NOT NULL DEFAULT '[]'
        );
        CREATE INDEX ix_webhook_deliveries_webhook ON webhook_deliveries (webhook_id, id);
        CREATE INDEX ix_webhook_deliveries_pending ON webhook_deliveries (webhook_id, id)
            WHERE status = 'pending';

        INSERT INTO device_event_state (device_id, online, battery_band, app_version, revoked)
        SELECT d.id,
               CASE WHEN s.device_id IS NULL THEN NULL
                    ELSE s.received_at >= now() - interval '180 seconds' END,
               CASE WHEN s.device_id IS NULL THEN NULL
                    WHEN s.battery_pct < 10 THEN 'critical' WHEN s.battery_pct < 20 THEN 'low'
                    ELSE 'ok' END,
               s.app_version,
               d.revoked_at IS NOT NULL
        FROM devices d LEFT JOIN device_last_status s ON s.device_id = d.id;
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE webhook_deliveries, webhooks, events, device_event_state CASCADE")

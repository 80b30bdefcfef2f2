"""Initial schema: devices, partitioned heartbeats, device_last_status, hb_partitions, job_runs.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE devices (
            id                    bigserial PRIMARY KEY,
            device_uid            text NOT NULL UNIQUE,
            name                  text,
            labels                text[] NOT NULL DEFAULT '{}',
            token_hash            bytea NOT NULL UNIQUE,
            prev_token_hash       bytea,
            prev_token_expires_at timestamptz,
            enrolled_at           timestamptz NOT NULL DEFAULT now(),
            revoked_at            timestamptz
        );
        CREATE INDEX ix_devices_prev_token_hash ON devices (prev_token_hash)
            WHERE prev_token_hash IS NOT NULL;
        CREATE INDEX ix_devices_labels ON devices USING gin (labels);

        CREATE TABLE heartbeats (
            device_id       bigint NOT NULL,
            bucket_ts       timestamptz NOT NULL,
            sent_at         timestamptz NOT NULL,
            received_at     timestamptz NOT NULL,
            clock_skew_s    real NOT NULL,
            battery_pct     smallint NOT NULL,
            charging        boolean NOT NULL,
            network_type    text NOT NULL,
            signal_dbm      smallint,
            app_version     text NOT NULL,
            os_version      text NOT NULL,
            uptime_s        bigint NOT NULL,
            free_storage_mb integer NOT NULL,
            extra           jsonb,
            PRIMARY KEY (device_id, bucket_ts)
        ) PARTITION BY RANGE (bucket_ts);

        CREATE TABLE device_last_status (
            device_id       bigint PRIMARY KEY,
            bucket_ts       timestamptz NOT NULL,
            sent_at         timestamptz NOT NULL,
            received_at     timestamptz NOT NULL,
            clock_skew_s    real NOT NULL,
            battery_pct     smallint NOT NULL,
            charging        boolean NOT NULL,
            network_type    text NOT NULL,
            signal_dbm      smallint,
            app_version     text NOT NULL,
            os_version      text NOT NULL,
            uptime_s        bigint NOT NULL,
            free_storage_mb integer NOT NULL
        );
        CREATE INDEX ix_last_status_received_at ON device_last_status (received_at);
        CREATE INDEX ix_last_status_battery ON device_last_status (battery_pct);
        CREATE INDEX ix_last_status_app_version ON device_last_status (app_version);

        CREATE TABLE hb_partitions (
            name         text PRIMARY KEY,
            range_start  timestamptz NOT NULL,
            range_end    timestamptz NOT NULL,
            state        text NOT NULL DEFAULT 'active'
                         CHECK (state IN ('active', 'archived', 'dropped')),
            row_count    bigint,
            archive_path text,
            sha256       text,
            created_at   timestamptz NOT NULL DEFAULT now(),
            archived_at  timestamptz
        );

        CREATE TABLE job_runs (
            id            bigserial PRIMARY KEY,
            job           text NOT NULL,
            started_at    timestamptz NOT NULL DEFAULT now(),
            finished_at   timestamptz,
            status        text NOT NULL
                          CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
            rows_affected bigint,
            detail        jsonb,
            error         text,
            trigger       text
        );
        CREATE INDEX ix_job_runs_job_started ON job_runs (job, started_at);
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE job_runs, hb_partitions, device_last_status, heartbeats, devices CASCADE"
    )

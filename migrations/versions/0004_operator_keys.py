"""Named operator keys with roles (viewer, operator, admin), and the audit trail of changes.

Revision ID: 0004_operator_keys
Revises: 0004_events_webhooks
"""

from alembic import op

revision = "0004_operator_keys"
down_revision = "0004_events_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE operator_keys (
            id bigserial PRIMARY KEY,
            name text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$'),
            role text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
            key_hash bytea NOT NULL UNIQUE,
            created_at timestamptz NOT NULL DEFAULT now(),
            created_by text NOT NULL,
            revoked_at timestamptz
        );
        CREATE TABLE audit_log (
            id bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(),
            actor text NOT NULL,
            actor_key_id bigint REFERENCES operator_keys (id),
            actor_role text NOT NULL,
            action text NOT NULL,
            target text,
            source_addr text,
            outcome text NOT NULL CHECK (outcome IN ('ok', 'denied', 'failed')),
            detail jsonb
        );
        CREATE INDEX ix_audit_log_action_id ON audit_log (action, id);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE audit_log; DROP TABLE operator_keys;")

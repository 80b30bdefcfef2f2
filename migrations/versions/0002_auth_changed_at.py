"""devices.auth_changed_at: when a device's tokens last changed (rotation, revocation).

Workers poll it once a second to evict changed tokens from their caches, so a revocation takes
effect everywhere within about a second while cached tokens live for minutes.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE devices ADD COLUMN auth_changed_at timestamptz;
        CREATE INDEX ix_devices_auth_changed_at ON devices (auth_changed_at)
            WHERE auth_changed_at IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE devices DROP COLUMN auth_changed_at")

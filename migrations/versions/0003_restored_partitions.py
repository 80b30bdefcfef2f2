"""hb_partitions: a 'restored' state and restored_at, for partitions brought back from an archive.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE hb_partitions DROP CONSTRAINT hb_partitions_state_check;
        ALTER TABLE hb_partitions ADD CONSTRAINT hb_partitions_state_check
            CHECK (state IN ('active', 'archived', 'dropped', 'restored'));
        ALTER TABLE hb_partitions ADD COLUMN restored_at timestamptz;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        UPDATE hb_partitions SET state = 'active' WHERE state = 'restored';
        ALTER TABLE hb_partitions DROP COLUMN restored_at;
        ALTER TABLE hb_partitions DROP CONSTRAINT hb_partitions_state_check;
        ALTER TABLE hb_partitions ADD CONSTRAINT hb_partitions_state_check
            CHECK (state IN ('active', 'archived', 'dropped'));
        """
    )

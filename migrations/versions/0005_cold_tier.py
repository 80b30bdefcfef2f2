"""hb_partitions: the cold tier. archive_format ('copy' | 'parquet') and archive_bytes of an
archived day; an 'expired' state (its files deleted after RETENTION_DAYS) with expired_at.

Revision ID: 0005_cold_tier
Revises: 0004_operator_keys
"""

from alembic import op

revision = "0005_cold_tier"
down_revision = "0004_operator_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE hb_partitions DROP CONSTRAINT hb_partitions_state_check;
        ALTER TABLE hb_partitions ADD CONSTRAINT hb_partitions_state_check
            CHECK (state IN ('active', 'archived', 'dropped', 'restored', 'expired'));
        ALTER TABLE hb_partitions ADD COLUMN archive_format text
            CHECK (archive_format IN ('copy', 'parquet'));
        ALTER TABLE hb_partitions ADD COLUMN archive_bytes bigint;
        ALTER TABLE hb_partitions ADD COLUMN expired_at timestamptz;
        UPDATE hb_partitions SET archive_format = 'copy' WHERE archive_path IS NOT NULL;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DELETE FROM hb_partitions WHERE state = 'expired';
        ALTER TABLE hb_partitions DROP COLUMN expired_at;
        ALTER TABLE hb_partitions DROP COLUMN archive_bytes;
        ALTER TABLE hb_partitions DROP COLUMN archive_format;
        ALTER TABLE hb_partitions DROP CONSTRAINT hb_partitions_state_check;
        ALTER TABLE hb_partitions ADD CONSTRAINT hb_partitions_state_check
            CHECK (state IN ('active', 'archived', 'dropped', 'restored'));
        """
    )

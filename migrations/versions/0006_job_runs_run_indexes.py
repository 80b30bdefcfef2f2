"""job_runs: a partial index for each check a job makes on every firing, so neither reads the
whole table (the events job fires every 30 s: ~2,880 succeeded runs a day, 30 days kept).

- ix_job_runs_succeeded_period (job, detail->>'period') WHERE status = 'succeeded': "did this
  job already succeed in this period?" (db.job_runs.succeeded_in_period).
- ix_job_runs_running (COALESCE(detail->>'lock', job)) WHERE status = 'running': "which runs of
  this lock were abandoned?" (db.job_runs.close_abandoned).

Revision ID: 0006_job_runs_run_indexes
Revises: 0005_cold_tier
"""

from alembic import op

revision = "0006_job_runs_run_indexes"
down_revision = "0005_cold_tier"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE INDEX ix_job_runs_succeeded_period ON job_runs (job, (detail->>'period'))
            WHERE status = 'succeeded';
        CREATE INDEX ix_job_runs_running ON job_runs ((COALESCE(detail->>'lock', job)))
            WHERE status = 'running';
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_job_runs_running; DROP INDEX ix_job_runs_succeeded_period;")

"""job list indexes

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 02:00:00
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # keyset pages of GET /v1/fine_tuning/jobs, newest first, with and without a namespace:
    # a page costs the same at 100 and at 100,000 jobs
    op.create_index("ix_jobs_created", "jobs", ["created_at", "id"])
    op.create_index("ix_jobs_namespace_created", "jobs", ["namespace_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_namespace_created", table_name="jobs")
    op.drop_index("ix_jobs_created", table_name="jobs")

"""publish leases

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 01:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A publish in flight: its object prefix, written before its first byte is uploaded, so
    # gc keeps those objects until the version row exists.
    op.create_table(
        "publish_leases",
        sa.Column("prefix", sa.String(512), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("publish_leases")

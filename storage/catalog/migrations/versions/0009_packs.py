"""packs: jobs that train together in one worker group

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 18:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "packs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("pack_key", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("max_slots", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_packs_pack_key", "packs", ["pack_key"])
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pack_id", sa.String(40), nullable=True))
        batch_op.create_foreign_key("fk_jobs_pack_id", "packs", ["pack_id"], ["id"])
        batch_op.create_index("ix_jobs_pack_id", ["pack_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_pack_id")
        batch_op.drop_constraint("fk_jobs_pack_id", type_="foreignkey")
        batch_op.drop_column("pack_id")
    op.drop_index("ix_packs_pack_key", table_name="packs")
    op.drop_table("packs")

"""namespace max priority

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 01:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the default maximum (0), which keeps every tenant equal until an admin says otherwise
    with op.batch_alter_table("namespaces", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_priority", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("namespaces", schema=None) as batch_op:
        batch_op.drop_column("max_priority")

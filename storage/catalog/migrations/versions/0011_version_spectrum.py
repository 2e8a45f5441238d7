"""adapter_versions.spectrum (each layer's singular values, stored at publish) and .method
(lora or dora)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 09:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spectrum", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("method", sa.String(16), nullable=False, server_default="lora")
        )


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_column("method")
        batch_op.drop_column("spectrum")

"""file list indexes

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 23:00:00
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # keyset pages of GET /v1/files, newest first, with and without a namespace
    op.create_index("ix_files_created", "files", ["created_at", "id"])
    op.create_index("ix_files_namespace_created", "files", ["namespace_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_files_namespace_created", table_name="files")
    op.drop_index("ix_files_created", table_name="files")

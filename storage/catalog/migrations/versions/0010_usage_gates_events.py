"""usage buckets, alias gates, catalog events and serving replica snapshots

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_buckets",
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("namespace", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_usage_buckets_model_minute", "usage_buckets", ["model", "minute"])
    op.create_table(
        "alias_gates",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("repo_id", sa.Integer(), sa.ForeignKey("adapter_repos.id"), nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("rule", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("repo_id", "alias", "rule"),
    )
    op.create_table(
        "catalog_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("repo_id", sa.Integer(), sa.ForeignKey("adapter_repos.id"), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("alias", sa.String(64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    op.create_index("ix_catalog_events_repo_id", "catalog_events", ["repo_id", "id"])
    op.create_table(
        "serving_replicas",
        sa.Column("replica_id", sa.String(128), primary_key=True),
        sa.Column("base", sa.String(64), nullable=False),
        sa.Column("node", sa.String(128), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("serving_replicas")
    op.drop_index("ix_catalog_events_repo_id", table_name="catalog_events")
    op.drop_table("catalog_events")
    op.drop_table("alias_gates")
    op.drop_index("ix_usage_buckets_model_minute", table_name="usage_buckets")
    op.drop_table("usage_buckets")

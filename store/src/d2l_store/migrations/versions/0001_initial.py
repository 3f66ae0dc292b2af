"""Initial schema: blobs, adapters, adapter_tags.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision: str = "0001"
down_revision: str | None = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("leased_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_blobs")),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("base_model", sa.String(256), nullable=False),
        sa.Column("hypernet", sa.String(256), nullable=False),
        sa.Column("rank_per_chunk", sa.Integer(), nullable=False),
        sa.Column("n_chunks", sa.Integer(), nullable=False),
        sa.Column("chunk_spans", sa.JSON(), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("n_modules", sa.Integer(), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("blob_digest", sa.String(64), nullable=False),
        sa.Column("source_hash", sa.String(128), nullable=True),
        sa.Column("source_text", sa.Text(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("supersedes", sa.String(32), nullable=True),
        sa.ForeignKeyConstraint(
            ["blob_digest"], ["blobs.digest"], name=op.f("fk_adapters_blob_digest_blobs"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
    )
    op.create_index("ix_adapters_scope", "adapters", ["tenant", "user_id", "agent_id", "session_id", "id"])
    op.create_index("ix_adapters_tenant_source_hash", "adapters", ["tenant", "source_hash"])
    op.create_index("ix_adapters_blob_digest", "adapters", ["blob_digest"])
    op.create_table(
        "adapter_tags",
        sa.Column("adapter_id", sa.String(32), nullable=False),
        sa.Column("tag", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_adapter_tags_adapter_id_adapters"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("adapter_id", "tag", name=op.f("pk_adapter_tags")),
    )
    op.create_index("ix_adapter_tags_tag", "adapter_tags", ["tag", "adapter_id"])


def downgrade() -> None:
    op.drop_table("adapter_tags")
    op.drop_table("adapters")
    op.drop_table("blobs")

"""Optional expiry per memory: adapters.expires_at and its index.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision: str = "0002"
down_revision: str | None = "0001"


def upgrade() -> None:
    op.add_column("adapters", sa.Column("expires_at", sa.DateTime(), nullable=True))
    op.create_index("ix_adapters_expires_at", "adapters", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_adapters_expires_at", table_name="adapters")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("expires_at")

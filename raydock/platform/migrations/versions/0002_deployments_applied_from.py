"""deployments.applied_from: the file raydock apply declared a deployment in

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 07:19:15.954421
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("applied_from", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("applied_from")

"""upload_chunks: an upload's chunks a row each; notification_deliveries.user_id, indexed

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 03:59:43.078161

- An upload session kept its received chunks as a JSON list (`upload_sessions.received`,
  chunk numbers as strings) that the registry rewrote whole for every chunk: O(n^2) per
  upload. They move to `upload_chunks` (session, chunk number: the primary key), a row
  each; a downgrade moves them back.
- A non-admin's deliveries were found by the JSON `event.userId`, which no index covers:
  `notification_deliveries.user_id` holds it (filled here for the rows there are; the
  registry fills it when it records one).

On SQLite, dropping or re-making `upload_sessions`' column recreates the table (batch mode),
and with foreign keys on, dropping the old table would delete (cascade) the chunks that
reference it: the column goes before `upload_chunks` exists, and comes back after it is gone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

upload_sessions = sa.table(
    "upload_sessions", sa.column("id", sa.String), sa.column("received", sa.JSON)
)
upload_chunks = sa.table(
    "upload_chunks", sa.column("session_id", sa.String), sa.column("chunk_number", sa.Integer)
)
deliveries = sa.table(
    "notification_deliveries", sa.column("event", sa.JSON), sa.column("user_id", sa.String)
)


def _create_upload_chunks() -> None:
    op.create_table(
        "upload_chunks",
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("chunk_number", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["upload_sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("session_id", "chunk_number"),
    )


def upgrade() -> None:
    conn = op.get_bind()
    lists = conn.execute(sa.select(upload_sessions.c.id, upload_sessions.c.received)).all()
    with op.batch_alter_table("upload_sessions", schema=None) as batch_op:
        batch_op.drop_column("received")
    _create_upload_chunks()
    rows = [
        {"session_id": session_id, "chunk_number": number}
        for session_id, received in lists
        for number in sorted({int(c) for c in received or []})
    ]
    if rows:
        conn.execute(upload_chunks.insert(), rows)

    with op.batch_alter_table("notification_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user_id", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_notification_deliveries_user_id"), ["user_id"], unique=False
        )
    conn.execute(deliveries.update().values(user_id=deliveries.c.event["userId"].as_string()))


def downgrade() -> None:
    with op.batch_alter_table("notification_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notification_deliveries_user_id"))
        batch_op.drop_column("user_id")

    conn = op.get_bind()
    chunks = upload_chunks.c
    received: dict[str, list[str]] = {}  # as revision 0001's registry kept them
    for session_id, number in conn.execute(
        sa.select(chunks.session_id, chunks.chunk_number).order_by(
            chunks.session_id, chunks.chunk_number
        )
    ):
        received.setdefault(session_id, []).append(str(number))
    op.drop_table("upload_chunks")
    with op.batch_alter_table("upload_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("received", sa.JSON(), nullable=True))
    for (session_id,) in conn.execute(sa.select(upload_sessions.c.id)).all():
        conn.execute(
            upload_sessions.update()
            .where(upload_sessions.c.id == session_id)
            .values(received=received.get(session_id, []))
        )
    with op.batch_alter_table("upload_sessions", schema=None) as batch_op:
        batch_op.alter_column("received", existing_type=sa.JSON(), nullable=False)

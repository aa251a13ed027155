"""user_webhooks.url_sealed, url_hint: a user's webhook URL sealed, masked where shown

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 17:00:37.954439

A webhook's URL may be its credential (a Slack webhook's path, a `?token=`): it is stored
sealed with the platform key (secrets.SecretBox) from now on, and shown masked
(notify.display_target) by every API. This revision:

- adds `url_sealed` and `url_hint`, fills `url_hint` for the webhooks there are, and lets
  `url` (the clear URL) be empty. It cannot seal: migrations run without the platform key
  (`raydock db upgrade`, a restore, db.make_sessionmaker), so the registry, which `raydock up`
  always starts with the key, seals every clear `url` into `url_sealed` and empties it when it
  starts (Registry._seal_clear_webhooks), before anything reads a webhook;
- masks the webhook targets of the deliveries recorded so far (they held the whole URL).
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _display_target(target: str) -> str:
    """notify.display_target as of this revision (a revision must not change with the code;
    the notifier matches a resumed delivery's target with the function's output)."""
    if "://" not in target:
        return target
    digest = hashlib.sha256(target.encode()).hexdigest()[:8]
    try:
        parts = urlsplit(target)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return f"URL ({digest})"
    rest = parts.path
    if parts.query:
        rest += "?" + parts.query
    if parts.fragment:
        rest += "#" + parts.fragment
    hidden = "" if rest in ("", "/") else "/…"
    if len(rest) >= 16:
        hidden += "/" + rest[-4:]
    return f"{parts.scheme}://{host}{hidden} ({digest})"


hooks = sa.table(
    "user_webhooks",
    sa.column("user_id", sa.String),
    sa.column("url", sa.String),
    sa.column("url_hint", sa.Text),
)
deliveries = sa.table(
    "notification_deliveries",
    sa.column("id", sa.String),
    sa.column("channel", sa.String),
    sa.column("target", sa.String),
)


def upgrade() -> None:
    with op.batch_alter_table("user_webhooks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("url_sealed", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("url_hint", sa.Text(), nullable=True))
        batch_op.alter_column("url", existing_type=sa.VARCHAR(length=2000), nullable=True)
    conn = op.get_bind()
    for user_id, url in conn.execute(sa.select(hooks.c.user_id, hooks.c.url)).all():
        conn.execute(
            hooks.update()
            .where(hooks.c.user_id == user_id)
            .values(url_hint=_display_target(url or ""))
        )
    webhook_targets = sa.select(deliveries.c.id, deliveries.c.target).where(
        deliveries.c.channel == "webhook"
    )
    for delivery_id, target in conn.execute(webhook_targets).all():
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == delivery_id)
            .values(target=_display_target(target))
        )


def downgrade() -> None:
    # a sealed URL cannot be opened here (no platform key): those webhooks are removed (their
    # users set them again); the deliveries' targets stay masked
    op.execute(sa.delete(hooks).where(hooks.c.url.is_(None)))
    with op.batch_alter_table("user_webhooks", schema=None) as batch_op:
        batch_op.alter_column("url", existing_type=sa.VARCHAR(length=2000), nullable=False)
        batch_op.drop_column("url_hint")
        batch_op.drop_column("url_sealed")

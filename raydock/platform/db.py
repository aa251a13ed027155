"""Database tables (SQLAlchemy 2). Only the registry actor writes; others may read."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    source: Mapped[str] = mapped_column(String(32))  # file | platform_hosted | hugging_face
    kind: Mapped[str] = mapped_column(String(16), default="base")  # base | adapter
    base_model_id: Mapped[str | None] = mapped_column(String(64))
    model_type: Mapped[str] = mapped_column(String(16), default="openSource")
    status: Mapped[str] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[str]] = mapped_column(default=list)
    artifact_uri: Mapped[str | None] = mapped_column(String(1000))
    checksum: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    deployconfig: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Deployment(Base):
    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the validated deploy body
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[str]] = mapped_column(default=list)
    timeout_s: Mapped[int] = mapped_column(Integer, default=60)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    added_by: Mapped[str | None] = mapped_column(String(64))
    added_on: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    # the file `raydock apply` declared it in; None: made by hand (apply --prune leaves it)
    applied_from: Mapped[str | None] = mapped_column(String(500))


class DeploymentVersion(Base):
    __tablename__ = "deployment_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(220))  # "<deployment name>_v<version>"
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    deployed_by: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    result: Mapped[str] = mapped_column(String(16), default="DEPLOYING")  # SUCCESS|FAILED|DEPLOYING
    failure_reason: Mapped[str | None] = mapped_column(Text)
    undeployed_by: Mapped[str | None] = mapped_column(String(64))
    undeploy_started_at: Mapped[datetime | None] = mapped_column(DateTime)
    undeploy_ended_at: Mapped[datetime | None] = mapped_column(DateTime)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(16))  # deployment | management
    deployment_id: Mapped[str | None] = mapped_column(ForeignKey("deployments.id"), index=True)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"))
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)


class KeyLimits(Base):
    """A deployment key's optional rate limits and daily token budget (metering/limits.py)."""

    __tablename__ = "api_key_limits"
    key_id: Mapped[str] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)


class Usage(Base):
    """Requests and tokens per minute, deployment, adapter and key. No foreign keys: usage
    outlives the keys and deployments it was counted for."""

    __tablename__ = "usage"
    minute: Mapped[datetime] = mapped_column(DateTime, primary_key=True)  # UTC, its start
    deployment_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # "": the base
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class DockStatus(Base):
    __tablename__ = "dock_status"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str | None] = mapped_column(String(64), index=True)
    deployment_id: Mapped[str | None] = mapped_column(String(64))
    job_type: Mapped[str] = mapped_column(String(16), default="MODELS")
    action: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    percentage: Mapped[int] = mapped_column(Integer, default=0)
    message: Mapped[str | None] = mapped_column(Text)
    response: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class HfConnection(Base):
    """A Hugging Face token for private and gated repos, encrypted (platform/secrets.py)."""

    __tablename__ = "hf_connections"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    token_sealed: Mapped[str] = mapped_column(Text)
    hf_user: Mapped[str | None] = mapped_column(String(200))  # who the token is, when tested
    last_test_ok: Mapped[bool | None] = mapped_column(Boolean)
    last_test_message: Mapped[str | None] = mapped_column(Text)
    last_tested_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class UploadSession(Base):
    __tablename__ = "upload_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    file_name: Mapped[str] = mapped_column(String(300))
    total_size: Mapped[int] = mapped_column(BigInteger)  # up to 2^53 (PostgreSQL: int8)
    total_chunks: Mapped[int] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class UploadChunk(Base):
    """A chunk an upload session has received, a row each: recording one is one insert (a
    list in the session's row, rewritten whole for every chunk, made an upload O(n^2))."""

    __tablename__ = "upload_chunks"
    session_id: Mapped[str] = mapped_column(
        ForeignKey("upload_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    chunk_number: Mapped[int] = mapped_column(Integer, primary_key=True)


# ---- notifications (platform/notify.py)


class NotificationDelivery(Base):
    """One event sent to one place (an address, a webhook URL), with its attempts."""

    __tablename__ = "notification_deliveries"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)  # notify.KINDS
    event: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the webhook body
    # the event's userId, a column of its own: a user's list filters on it (indexed)
    user_id: Mapped[str | None] = mapped_column(String(64), index=True)
    channel: Mapped[str] = mapped_column(String(16))  # email | webhook
    target: Mapped[str] = mapped_column(String(2000))  # an address or a URL
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)


class UserWebhook(Base):
    """A user's own webhook; its URL (which may carry its credential: a Slack webhook's path,
    a `?token=`) and its signing secret sealed as connection tokens are."""

    __tablename__ = "user_webhooks"
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    url_sealed: Mapped[str | None] = mapped_column(Text)
    url_hint: Mapped[str | None] = mapped_column(Text)  # notify.display_target: all APIs show
    # the URL in clear as raydocks before revision 0003 stored it: the registry seals it into
    # url_sealed and empties this when it starts (the migration cannot: no platform key)
    url: Mapped[str | None] = mapped_column(String(2000))
    secret_sealed: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WebSession(Base):
    """A browser signed in to the dashboard (platform/sessions.py): its signed cookie names
    this row, so signing out (deleting it) or deleting the key it began with ends it."""

    __tablename__ = "web_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class DatabaseRefused(RuntimeError):
    """The platform cannot start on this database (another platform holds it, or its schema
    is one this raydock does not know); the message says why in one line."""


class PlatformLease(Base):
    """Who holds the database (platform/lease.py), for messages and `raydock db current`;
    the lock itself is PostgreSQL's advisory lock or a lock file beside a SQLite database."""

    __tablename__ = "platform_lease"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # always 1
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    platform: Mapped[str] = mapped_column(String(200), default="")  # Ray session, or a command
    acquired_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3, the driver raydock installs
    (SQLAlchemy 2.0 would pick psycopg2 for the first and reads no `postgres://` at all)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL; None for another backend or an in-memory one."""
    from sqlalchemy.engine import make_url

    u = make_url(normalize_url(url))
    database = u.database or ""
    if u.get_backend_name() != "sqlite" or database in ("", ":memory:") or "mode=memory" in str(u):
        return None
    return Path(database)


def safe_url(url: str) -> str:
    """The URL for messages: its password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can read: say nothing of it
        return "(an unreadable database URL)"


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if not url.startswith("sqlite"):
        # a database server restarted under a running platform: pooled connections are
        # checked before use instead of failing the next transaction
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(conn, _record):  # WAL: readers (gateway) never block the writer
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
        # pysqlite opens a transaction only before a data change: the schema changes of a
        # migration that broke off stayed, under the old revision, and every retry failed.
        # SQLAlchemy's recipe: the driver begins nothing, SQLAlchemy begins every transaction.
        conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        conn.exec_driver_sql("BEGIN")

    return engine


def make_sessionmaker(url: str | Engine, create: bool = False) -> sessionmaker:
    """Sessions on `url` (or an engine); `create`: bring the schema to this raydock's version
    first (platform/migrations: creates it in an empty database, adopts one made before
    migrations existed, refuses one newer than this raydock)."""
    engine = make_engine(url) if isinstance(url, str) else url
    if create:
        from raydock.platform import migrations

        migrations.upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)

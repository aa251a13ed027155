"""The registry: the only writer of the database.

A plain class, run as a detached named Ray actor by the platform (so calls are serialized and
SQLite has exactly one writer) and usable directly in unit tests. Every method returns
API-shaped dicts (see views.py) and raises NotFound / Conflict / InvalidTransition.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import ray
from sqlalchemy import Text, cast, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from raydock import names, params
from raydock.errors import Conflict, NotFound
from raydock.platform import db, schemas, security, views
from raydock.platform.lease import Lease, ray_session
from raydock.platform.secrets import SecretBox, SecretUnreadable
from raydock.platform.states import (
    ACTIVE_DEPLOYMENT,
    DELETABLE_DEPLOYMENT,
    IMPORTING_MODEL,
    RETRYABLE_SOURCES,
    STARTING_DEPLOYMENT,
    UNDEPLOYABLE_DEPLOYMENT,
    DeploymentStatus,
    InvalidTransition,
    JobAction,
    JobStatus,
    ModelStatus,
    check_deployment,
    check_job,
    check_model,
    is_serving,
    undeployable_model,
)


def _tell(actor: str, method: str, *args: Any) -> None:
    """Call a platform actor without waiting; nothing when there is none (unit tests, or a
    moment after it died: the supervisor starts another)."""
    if not ray.is_initialized():
        return
    try:
        handle = ray.get_actor(actor, namespace=names.NAMESPACE)
    except ValueError:
        return
    getattr(handle, method).remote(*args)


def _tell_meter(method: str, *args: Any) -> None:
    _tell(names.METER, method, *args)


#: how long a new registry waits for the lease: its predecessor's process (killed, or dead
#: with its node) may still be going away after Ray has already freed the actor's name
LEASE_WAIT_S = 15.0


def _leave_if_actor(reason: str) -> None:
    """The lease went to another platform: a registry actor ends (the supervisor's next one
    takes the lease again once it is free, or refuses); a plain object just refuses writes."""
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
        os._exit(1)


#: a usage row's period, as the API shows it: per database, the minute's text truncated
_PERIOD_FORMATS = {
    "sqlite": {"day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H:00Z", "minute": "%Y-%m-%dT%H:%MZ"},
    "postgresql": {
        "day": "YYYY-MM-DD",
        "hour": 'YYYY-MM-DD"T"HH24":00Z"',
        "minute": 'YYYY-MM-DD"T"HH24:MI"Z"',
    },
}


def _usage_period(dialect: str, by: str) -> Any:
    """The SQL expression of a usage minute's period (None: "total", no period)."""
    if by == "total":
        return None
    fmt = _PERIOD_FORMATS[dialect][by]
    if dialect == "sqlite":
        return func.strftime(fmt, db.Usage.minute)
    return func.to_char(db.Usage.minute, fmt)


def _insert_unless_there(s: Session, table: type[db.Base], **values: Any) -> None:
    """Insert a row; one with the same primary key already there stays as it is (INSERT ...
    ON CONFLICT DO NOTHING, which both databases raydock runs on have, each in its dialect)."""
    dialect = postgresql if s.bind.dialect.name == "postgresql" else sqlite
    s.execute(dialect.insert(table).values(**values).on_conflict_do_nothing())


#: the order models are listed in: newest first, the id breaking ties, so that the pages of
#: the list hold each model once
MODEL_ORDER = (db.Model.created_at.desc(), db.Model.id.desc())


class Registry:
    def __init__(
        self, db_url: str, secret_key: bytes | None = None, lease_wait_s: float = LEASE_WAIT_S
    ):
        # the platform lease first (platform/lease.py: one platform per database), then the
        # schema brought to this raydock's version (platform/migrations); either refuses with
        # db.DatabaseRefused, which `raydock up` prints as one line
        self._lease = Lease(db_url, ray_session())
        self._lease.acquire(wait_s=lease_wait_s)
        try:
            self._sessions = db.make_sessionmaker(db_url, create=True)
            self._lease.record(self._sessions.kw["bind"])
        except BaseException:
            self._lease.release()
            raise
        self._lease.watch(on_lost=_leave_if_actor)
        # Hugging Face tokens are sealed with it (None: a registry that stores none)
        self._secrets = SecretBox(secret_key) if secret_key else None
        self._access_changed: set[str] = set()  # deployments whose access data this tx changed
        self._jobs_ended: list[tuple[str, str, float]] = []  # (action, status, seconds)
        self._notices: list[tuple[str, str | None, dict]] = []  # notify.emit after commit
        self._seal_clear_webhooks()  # webhook URLs an older raydock stored in clear

    def close(self) -> None:
        """Give the lease back and close the database connections (the end of the process
        does both for a registry actor)."""
        self._lease.release()
        self._sessions.kw["bind"].dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        if self._lease.lost:  # another platform owns the database now: write nothing
            raise db.DatabaseRefused(self._lease.lost)
        try:
            with self._sessions.begin() as s:
                yield s
        except BaseException:
            self._access_changed.clear()
            self._jobs_ended.clear()
            self._notices.clear()
            raise
        if self._access_changed:  # committed: the replicas learn it now
            changed, self._access_changed = sorted(self._access_changed), set()
            self._publish(self.access_snapshots(changed))
        if self._jobs_ended:
            ended, self._jobs_ended = self._jobs_ended, []
            _tell_meter("jobs_ended", ended)
        if self._notices:
            self._emit_notices()

    # ---------------------------------------------------------------- access data for replicas

    def access_snapshots(self, deployment_ids: list[str] | None = None) -> dict[str, Any]:
        """Each deployment's access snapshot (serve_apps.access.DeploymentAccess as a dict);
        None for one that does not exist. All of them when `deployment_ids` is None."""
        with self._tx() as s:
            q = select(db.Deployment)
            if deployment_ids is not None:
                q = q.where(db.Deployment.id.in_(deployment_ids))
            found = {d.id: self._access(s, d) for d in s.scalars(q)}
        if deployment_ids is None:
            return found
        return {dep_id: found.get(dep_id) for dep_id in deployment_ids}

    @staticmethod
    def _access(s: Session, d: db.Deployment) -> dict[str, Any]:
        keys = s.scalars(select(db.ApiKey).where(db.ApiKey.deployment_id == d.id)).all()
        previous_live = Registry._last_two_versions(s, d.id)[1] is not None
        return {
            "deploymentId": d.id,
            "name": d.name,
            "created": int(d.added_on.replace(tzinfo=UTC).timestamp()),  # stored naive UTC
            "status": d.status,
            "serving": is_serving(d.status, previous_live),
            "timeoutS": d.timeout_s,
            "defaults": dict((d.config or {}).get("hyperParameters") or {}),
            "keys": {k.key_hash: k.id for k in keys if k.scope == "deployment"},
            "limits": Registry._limits_of(s, [k.id for k in keys if k.scope == "deployment"]),
            "adapters": Registry._servable_adapters(s, d.model_id),
            "stamp": time.time_ns(),
        }

    @staticmethod
    def _latest_version(s: Session, deployment_id: str) -> db.DeploymentVersion | None:
        return s.scalar(
            select(db.DeploymentVersion)
            .where(db.DeploymentVersion.deployment_id == deployment_id)
            .order_by(db.DeploymentVersion.version.desc())
        )

    @staticmethod
    def _last_two_versions(
        s: Session, deployment_id: str
    ) -> tuple[db.DeploymentVersion | None, db.DeploymentVersion | None]:
        """(the latest version, the one before it if its replicas still run: it deployed and
        was neither undeployed nor lost since — a redeploy of it serves meanwhile)."""
        latest, previous = (
            list(
                s.scalars(
                    select(db.DeploymentVersion)
                    .where(db.DeploymentVersion.deployment_id == deployment_id)
                    .order_by(db.DeploymentVersion.version.desc())
                    .limit(2)
                )
            )
            + [None, None]
        )[:2]
        live = previous is not None and previous.result == "SUCCESS"
        return latest, previous if live and previous.undeploy_started_at is None else None

    @staticmethod
    def _servable_adapters(s: Session, model_id: str) -> dict[str, dict[str, Any]]:
        """The READY adapters of a base model, as its deployments serve them by request:
        adapter id -> name, rank and where the adapter is in the artifact store (and, for one
        that has them, what keeps it from being applied per request)."""
        ready = select(db.Model).where(
            db.Model.base_model_id == model_id, db.Model.status == ModelStatus.READY
        )
        adapters = {}
        for a in s.scalars(ready.order_by(db.Model.created_at)):
            facts = a.meta.get("adapter") or {}
            adapters[a.id] = {
                "name": a.name,
                "rank": int(facts.get("rank") or 0),
                "prefix": a.artifact_uri,
                "digest": a.meta.get("artifactDigest"),
            }
            if facts.get("per_request_unsupported"):  # refused by ReplicaAdapters.check
                adapters[a.id]["perRequestUnsupported"] = list(facts["per_request_unsupported"])
        return adapters

    def _base_deployments_changed(self, s: Session, m: db.Model) -> None:
        """An adapter came or went: its base model's deployments serve another set."""
        if m.kind == "adapter" and m.base_model_id:
            deps = select(db.Deployment.id).where(db.Deployment.model_id == m.base_model_id)
            self._access_changed.update(s.scalars(deps))

    @staticmethod
    def _publish(snapshots: dict[str, Any]) -> None:
        """Hand changed snapshots to the access hub (none in unit tests: nothing to push to;
        none for a moment after it died: the new one loads everything)."""
        _tell(names.ACCESS_HUB, "publish", snapshots)

    def ping(self) -> bool:
        return True

    # ---------------------------------------------------------------- users & auth

    def _user_names(self, s: Session) -> dict[str, str]:
        return {u.id: u.name for u in s.scalars(select(db.User))}

    def ensure_admin(self, initial_key: str | None = None) -> str | None:
        """On first start create the admin user and key; return the key (shown once) or None."""
        with self._tx() as s:
            if s.scalar(select(func.count()).select_from(db.User)):
                return None
            admin = db.User(id=db.new_id("u"), name="admin", is_admin=True)
            s.add(admin)
            s.flush()
            key = initial_key or security.new_key(security.MANAGEMENT_PREFIX)
            s.add(self._key_row(key, "admin (first start)", "management", None, admin.id, admin.id))
            return key

    def create_user(
        self, name: str, email: str | None, is_admin: bool, created_by: str
    ) -> dict[str, Any]:
        with self._tx() as s:
            u = db.User(id=db.new_id("u"), name=name, email=email, is_admin=is_admin)
            s.add(u)
            s.flush()
            key = security.new_key(security.MANAGEMENT_PREFIX)
            row = self._key_row(key, f"{name} (management)", "management", None, u.id, created_by)
            s.add(row)
            return {**views.user(u), "apiKey": key, "keyId": row.id}

    def list_users(self) -> list[dict[str, Any]]:
        """Every user, with how many management keys they hold (never the keys)."""
        with self._tx() as s:
            counts = dict(
                s.execute(
                    select(db.ApiKey.user_id, func.count())
                    .where(db.ApiKey.scope == "management")
                    .group_by(db.ApiKey.user_id)
                ).all()
            )
            users = s.scalars(select(db.User).order_by(db.User.created_at, db.User.id))
            return [views.user(u) | {"managementKeys": counts.get(u.id, 0)} for u in users]

    def _user(self, s: Session, user_id: str) -> db.User:
        u = s.get(db.User, user_id)
        if u is None:
            raise NotFound(f"user {user_id} not found")
        return u

    def _end_management_access(self, s: Session, user_id: str) -> None:
        """Delete a user's management keys and so every dashboard session begun with them."""
        s.execute(delete(db.WebSession).where(db.WebSession.user_id == user_id))
        s.execute(
            delete(db.ApiKey).where(db.ApiKey.user_id == user_id, db.ApiKey.scope == "management")
        )

    def delete_user(self, user_id: str, by_user_id: str) -> dict[str, Any]:
        """Remove a user: their management keys, sessions and webhook go at once; what they
        created (models, deployments, keys) stays, naming them by id."""
        with self._tx() as s:
            u = self._user(s, user_id)
            if user_id == by_user_id:  # so an admin always remains: the one deleting
                raise Conflict("you cannot delete yourself; another admin can")
            by = s.get(db.User, by_user_id)
            if by is None or not by.is_admin:  # checked at sign-in: two admins deleting each
                # other at once would both have passed, and left no admin
                raise Conflict("you are no longer an admin of this platform")
            self._end_management_access(s, user_id)
            s.execute(delete(db.UserWebhook).where(db.UserWebhook.user_id == user_id))
            s.delete(u)
            return {"userId": user_id, "deleted": True}

    def rotate_management_key(self, user_id: str, by_user_id: str) -> dict[str, Any]:
        """A new management key for the user (shown once); their old keys and the dashboard
        sessions begun with them stop working at once."""
        with self._tx() as s:
            u = self._user(s, user_id)
            self._end_management_access(s, user_id)
            s.flush()
            key = security.new_key(security.MANAGEMENT_PREFIX)
            row = self._key_row(key, f"{u.name} (management)", "management", None, u.id, by_user_id)
            s.add(row)
            return {**views.user(u), "apiKey": key, "keyId": row.id}

    def authenticate_management(self, key: str) -> dict[str, Any] | None:
        with self._tx() as s:
            row = s.scalar(select(db.ApiKey).where(db.ApiKey.key_hash == security.hash_key(key)))
            if row is None or row.scope != "management":
                return None
            row.last_used_at = db.utcnow()
            return views.user(s.get(db.User, row.user_id))

    def start_web_session(
        self, key: str, session_id: str, expires_at: float
    ) -> dict[str, Any] | None:
        """A dashboard sign-in: the user behind a management key, with the session recorded
        (None, and nothing recorded, for any other key). Expired sessions are dropped here."""
        with self._tx() as s:
            row = s.scalar(select(db.ApiKey).where(db.ApiKey.key_hash == security.hash_key(key)))
            if row is None or row.scope != "management":
                return None
            row.last_used_at = now = db.utcnow()
            s.execute(delete(db.WebSession).where(db.WebSession.expires_at < now))
            expires = datetime.fromtimestamp(expires_at, UTC).replace(tzinfo=None)
            s.add(
                db.WebSession(id=session_id, user_id=row.user_id, key_id=row.id, expires_at=expires)
            )
            return views.user(s.get(db.User, row.user_id))

    def session_user(self, session_id: str, user_id: str) -> dict[str, Any] | None:
        """The user of a live dashboard session: not signed out, not expired, and the
        management key it began with not deleted."""
        with self._tx() as s:
            ws = s.get(db.WebSession, session_id)
            if ws is None or ws.user_id != user_id or ws.expires_at <= db.utcnow():
                return None
            key = s.get(db.ApiKey, ws.key_id)
            if key is None or key.scope != "management" or key.user_id != user_id:
                return None
            return views.user(s.get(db.User, user_id))

    def end_web_session(self, session_id: str) -> None:
        with self._tx() as s:
            s.execute(delete(db.WebSession).where(db.WebSession.id == session_id))

    # ---------------------------------------------------------------- models

    @staticmethod
    def _ready_base(s: Session, base_model_id: str) -> None:
        base = s.get(db.Model, base_model_id)
        if base is None or base.status != ModelStatus.READY or base.kind != "base":
            raise Conflict(f"baseModelId {base_model_id} is not a ready base model")

    def check_base_model(self, base_model_id: str) -> None:
        """409 unless an adapter can be imported onto `base_model_id` now (a chunked upload
        asks before its first chunk, not after its last)."""
        with self._tx() as s:
            self._ready_base(s, base_model_id)

    def create_model(
        self,
        name: str,
        source: str,
        created_by: str,
        kind: str = "base",
        base_model_id: str | None = None,
        description: str = "",
        tags: list[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A model IMPORTING; `meta` may carry its origin (a Hugging Face repo, a catalog
        entry) so lists show it while the import runs."""
        with self._tx() as s:
            return views.model(
                self._add_model(
                    s, name, source, created_by, kind, base_model_id, description, tags, meta
                )
            )

    def begin_import(
        self,
        name: str,
        source: str,
        created_by: str,
        kind: str = "base",
        base_model_id: str | None = None,
        description: str = "",
        tags: list[str] | None = None,
        meta: dict[str, Any] | None = None,
        deploy: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The model IMPORTING, the deployment that waits for it (`deploy`: its body) and
        the import job, in one transaction: a failure between separate calls left a model
        IMPORTING for ever, with no job for reconciliation to fail (and, for a catalog entry,
        every later deploy of it refused as "being imported"). Returns {model, job,
        deployment}."""
        with self._tx() as s:
            m = self._add_model(
                s, name, source, created_by, kind, base_model_id, description, tags, meta
            )
            d = None
            if deploy is not None:
                d = self._add_deployment(s, m, deploy, created_by, awaiting_import=True)
            job = self._add_job(s, JobAction.IMPORT, m.id, created_by, d and d.id)
            shown = views.deployment(d, self._user_names(s)) if d else None
            return {"model": views.model(m), "job": job, "deployment": shown}

    def _add_model(
        self,
        s: Session,
        name: str,
        source: str,
        created_by: str,
        kind: str,
        base_model_id: str | None,
        description: str,
        tags: list[str] | None,
        meta: dict[str, Any] | None,
    ) -> db.Model:
        if base_model_id:
            self._ready_base(s, base_model_id)
        m = db.Model(
            id=db.new_id("cm"),
            name=name[:200],  # a zip's file name may be longer; PostgreSQL holds to 200
            source=source,
            kind=kind,
            base_model_id=base_model_id,
            model_type="openSource",
            status=ModelStatus.IMPORTING,
            description=description,
            tags=tags or [],
            meta=meta or {},
            created_by=created_by,
        )
        s.add(m)
        s.flush()
        return m

    def begin_retry_import(self, model_id: str, user_id: str) -> dict[str, Any]:
        """IMPORT_FAILED → IMPORTING for a download import, with a new import job (carrying
        the deployment that waited for the failed one, if it never deployed); returns
        {"model", "job"}."""
        with self._tx() as s:
            m = self._model(s, model_id)
            if m.source not in RETRYABLE_SOURCES:
                raise Conflict(
                    f"model {model_id} was uploaded ({m.source}); upload the file again to "
                    "import it anew"
                )
            if m.status != ModelStatus.IMPORT_FAILED:
                raise Conflict(f"only a failed import can be retried; model is {m.status}")
            m.status, m.error = ModelStatus.IMPORTING, None
            last = s.scalar(
                select(db.DockStatus)
                .where(db.DockStatus.model_id == model_id, db.DockStatus.action == JobAction.IMPORT)
                .order_by(db.DockStatus.created_at.desc())
            )
            waiting = last.deployment_id if last is not None else None
            if waiting and not self._never_deployed(s, waiting):
                waiting = None
            if waiting:  # it waits for the import again (and fails again if the import does)
                d = self._deployment(s, waiting)
                check_deployment(d.status, DeploymentStatus.READY_TO_DEPLOY)
                d.status, d.failure_reason = DeploymentStatus.READY_TO_DEPLOY, None
                self._access_changed.add(d.id)
            job = self._add_job(s, JobAction.IMPORT, model_id, user_id, waiting)
            return {"model": views.model(m), "job": job}

    @staticmethod
    def _never_deployed(s: Session, deployment_id: str) -> bool:
        d = s.get(db.Deployment, deployment_id)
        versions = select(func.count()).where(db.DeploymentVersion.deployment_id == deployment_id)
        return d is not None and d.status == DeploymentStatus.FAILED and not s.scalar(versions)

    def _model(self, s: Session, model_id: str) -> db.Model:
        m = s.get(db.Model, model_id)
        if m is None:
            raise NotFound(f"model {model_id} not found")
        return m

    def _deployments_of(self, s: Session, model_id: str) -> list[db.Deployment]:
        q = select(db.Deployment).where(db.Deployment.model_id == model_id)
        return list(s.scalars(q.order_by(db.Deployment.added_on)))

    def get_model(self, model_id: str) -> dict[str, Any]:
        with self._tx() as s:
            m = self._model(s, model_id)
            out = views.model(m, self._deployments_of(s, model_id))
            out["artifactUri"] = m.artifact_uri
            return out

    def list_models(self) -> list[dict[str, Any]]:
        """Every model, newest first (apply's view of the platform; the API pages them)."""
        return self.models_page(None)["models"]

    def models_page(self, limit: int | None, offset: int = 0) -> dict[str, Any]:
        """`limit` models (None: all) from `offset` in MODEL_ORDER, each with its deployments'
        counts, and `total`: how many models there are. Only the page's rows are read."""
        with self._tx() as s:
            page = select(db.Model).order_by(*MODEL_ORDER).offset(offset).limit(limit)
            on_page = db.Deployment.model_id.in_(page.with_only_columns(db.Model.id))
            deps: dict[str, list[db.Deployment]] = {}
            for d in s.scalars(select(db.Deployment).where(on_page)):
                deps.setdefault(d.model_id, []).append(d)
            models = [views.model(m, deps.get(m.id, [])) for m in s.scalars(page)]
            return {"models": models, "total": s.scalar(select(func.count(db.Model.id)))}

    def update_model(
        self, model_id: str, description: str | None, tags: list[str] | None
    ) -> dict[str, Any]:
        with self._tx() as s:
            m = self._model(s, model_id)
            if description is not None:
                m.description = description
            if tags is not None:
                m.tags = tags
            return views.model(m, self._deployments_of(s, model_id))

    def set_model_status(
        self, model_id: str, status: str, job_id: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Persist a model state transition plus fields set by the import job; with `job_id`
        (READY or IMPORT_FAILED), that import job ends with it, in the same transaction: a
        crash between the two left a READY model whose job reconciliation then failed, and
        the deployment waiting for it with it."""
        with self._tx() as s:
            m = self._model(s, model_id)
            check_model(m.status, status)
            m.status = status
            for k, v in fields.items():
                setattr(m, k, v)
            self._base_deployments_changed(s, m)
            if status == ModelStatus.IMPORT_FAILED:
                self._import_failed_notice(s, m)
            if job_id is not None:
                self._end_import_job(s, job_id, status, fields.get("error"))
            return views.model(m)

    def _end_import_job(self, s: Session, job_id: str, model_status: str, error: str | None):
        j = s.get(db.DockStatus, job_id)
        if j is None or j.status != JobStatus.IN_PROGRESS:
            return
        if model_status == ModelStatus.READY:
            self._end_job(j, JobStatus.SUCCESS, "imported")
        else:
            self._end_job(j, JobStatus.FAILED, error)
            self._fail_waiting_deployment(s, j, error)

    def delete_model(self, model_id: str) -> dict[str, Any]:
        """Remove a model with no active deployment; returns it for cleanup (with artifactUri,
        and checksumShared: whether another model holds the same weights)."""
        with self._tx() as s:
            m = self._model(s, model_id)
            deps = self._deployments_of(s, model_id)
            active = [d.id for d in deps if d.status in ACTIVE_DEPLOYMENT]
            if active:
                raise Conflict(f"model has active deployments {active}; undeploy them first")
            adapters = sorted(
                s.scalars(select(db.Model.id).where(db.Model.base_model_id == model_id))
            )
            if adapters:
                raise Conflict(
                    f"adapters {adapters} are imported on this base model; delete them first"
                )
            shared = m.checksum is not None and bool(
                s.scalar(
                    select(func.count()).where(
                        db.Model.checksum == m.checksum, db.Model.id != model_id
                    )
                )
            )
            # the caller removes the files; conversions only when no other model has them
            out = {
                **views.model(m),
                "artifactUri": m.artifact_uri,
                "checksumShared": shared,
                "deletedDeployments": [d.id for d in deps],  # undeployed ones go with it
            }
            # an import or export still running ends here (its task finds the model gone)
            running = select(db.DockStatus).where(
                db.DockStatus.model_id == model_id, db.DockStatus.status == JobStatus.IN_PROGRESS
            )
            out["endedJobs"] = []
            for j in s.scalars(running):
                self._end_job(j, JobStatus.FAILED, "the model was deleted")
                out["endedJobs"].append(j.id)
            for d in deps:
                self._delete_deployment_rows(s, d.id)
            self._base_deployments_changed(s, m)
            s.delete(m)
            return out

    # ---------------------------------------------------------------- jobs (dock status)

    def create_job(
        self,
        action: str,
        model_id: str | None,
        created_by: str | None,
        deployment_id: str | None = None,
    ) -> dict[str, Any]:
        with self._tx() as s:
            return self._add_job(s, action, model_id, created_by, deployment_id)

    @staticmethod
    def _add_job(
        s: Session, action: str, model_id: str | None, by: str | None, deployment_id: str | None
    ) -> dict[str, Any]:
        j = db.DockStatus(
            id=db.new_id("ds"),
            model_id=model_id,
            deployment_id=deployment_id,
            action=action,
            status=JobStatus.IN_PROGRESS,
            created_by=by,
        )
        s.add(j)
        s.flush()
        return views.job(j)

    def update_job(
        self,
        job_id: str,
        status: str | None = None,
        percentage: int | None = None,
        message: str | None = None,
        response: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        with self._tx() as s:
            j = self._job(s, job_id)
            if status is not None:
                check_job(j.status, status)
                j.status = status
                self._job_ended(j)
                if status == JobStatus.SUCCESS:
                    j.percentage = 100
                if status == JobStatus.FAILED:
                    self._fail_waiting_deployment(s, j, message)
            elif j.status != JobStatus.IN_PROGRESS:  # ended: a late progress report (a task
                return views.job(j)  # still running after its job failed) changes nothing
            if percentage is not None and j.status == JobStatus.IN_PROGRESS:
                j.percentage = max(j.percentage, min(100, int(percentage)))
            if message is not None:
                j.message = message
            if response:
                j.response = {**(j.response or {}), **response}
            return views.job(j)

    def _end_job(self, j: db.DockStatus, status: str, message: str | None) -> None:
        """End a running job: SUCCESS at 100 %, or FAILED with `message` as its error."""
        check_job(j.status, status)
        j.status, j.message = status, message
        if status == JobStatus.SUCCESS:
            j.percentage = 100
        else:
            j.response = {**(j.response or {}), "error": message}
        self._job_ended(j)

    def _job_ended(self, j: db.DockStatus) -> None:
        if j.status != JobStatus.IN_PROGRESS:  # for the meter's job metrics, once committed
            took = (db.utcnow() - j.created_at).total_seconds()
            self._jobs_ended.append((j.action, j.status, max(0.0, took)))

    def get_job(self, job_id: str) -> dict[str, Any]:
        with self._tx() as s:
            return views.job(self._job(s, job_id))

    @staticmethod
    def _job(s: Session, job_id: str) -> db.DockStatus:
        j = s.get(db.DockStatus, job_id)
        if j is None:
            raise NotFound(f"dock status {job_id} not found")
        return j

    def existing_jobs(self, job_ids: list[str]) -> list[str]:
        """Which of these jobs are still recorded (retention deletes finished ones)."""
        with self._tx() as s:
            return list(s.scalars(select(db.DockStatus.id).where(db.DockStatus.id.in_(job_ids))))

    def existing_models(self, model_ids: list[str]) -> list[str]:
        """Which of these models are still recorded (retention deletes a deleted one's files)."""
        with self._tx() as s:
            return list(s.scalars(select(db.Model.id).where(db.Model.id.in_(model_ids))))

    def orphan_jobs(self, running: list[str], grace_s: float) -> list[dict[str, Any]]:
        """Jobs IN_PROGRESS that no worker runs: not in `running` (the lifecycle's own) and
        older than `grace_s` (a job the API just created is handed to the lifecycle next)."""
        cutoff = db.utcnow() - timedelta(seconds=grace_s)
        with self._tx() as s:
            q = select(db.DockStatus).where(
                db.DockStatus.status == JobStatus.IN_PROGRESS, db.DockStatus.created_at < cutoff
            )
            running_ids = set(running)
            return [views.job(j) for j in s.scalars(q) if j.id not in running_ids]

    def stranded_waits(self, running: list[str]) -> list[str]:
        """Imports that ended READY, not in `running`, whose deployment still waits for them
        (READY_TO_DEPLOY): their lifecycle ended between the two (the deploy never came)."""
        with self._tx() as s:
            q = (
                select(db.DockStatus.id)
                .join(db.Deployment, db.Deployment.id == db.DockStatus.deployment_id)
                .where(
                    db.DockStatus.action == JobAction.IMPORT,
                    db.DockStatus.status == JobStatus.SUCCESS,
                    db.Deployment.status == DeploymentStatus.READY_TO_DEPLOY,
                )
            )
            running_ids = set(running)
            return [job_id for job_id in s.scalars(q) if job_id not in running_ids]

    def fail_jobs(self, job_ids: list[str], reason: str) -> dict[str, list[str]]:
        """End these jobs FAILED with `reason`, and fail what they were moving: the model an
        import was bringing in, the deployment a deploy was starting (a redeploy's keeps its
        live version: `kept` lists those whose app must be run again with it)."""
        failed: dict[str, list[str]] = {"jobs": [], "models": [], "deployments": [], "kept": []}
        with self._tx() as s:
            for j in s.scalars(select(db.DockStatus).where(db.DockStatus.id.in_(job_ids))):
                if j.status != JobStatus.IN_PROGRESS:
                    continue
                self._end_job(j, JobStatus.FAILED, reason)
                failed["jobs"].append(j.id)
                m = s.get(db.Model, j.model_id) if j.action == JobAction.IMPORT else None
                if m is not None and m.status in IMPORTING_MODEL:
                    m.status, m.error = ModelStatus.IMPORT_FAILED, reason
                    failed["models"].append(m.id)
                    self._import_failed_notice(s, m, j.created_by)
                self._fail_waiting_deployment(s, j, reason)
                d = s.get(db.Deployment, j.deployment_id) if j.action == JobAction.DEPLOY else None
                # an interrupted redeploy: the live version serves on (OPTIMIZING had not
                # touched Serve; DEPLOYING may have: "kept" tells the lifecycle to run the
                # live version's app again)
                if d is not None and d.status in STARTING_DEPLOYMENT:
                    deploying = d.status == DeploymentStatus.DEPLOYING
                    if self._keep_live(s, d, reason):
                        if deploying:
                            failed["kept"].append(d.id)
                        continue
                if d is not None and d.status in STARTING_DEPLOYMENT:
                    d.status, d.failure_reason = DeploymentStatus.FAILED, reason
                    self._access_changed.add(d.id)  # replicas and the gateway stop serving it
                    self._end_version(s, d.id, "FAILED", reason)
                    failed["deployments"].append(d.id)
                    self._deployment_notice(s, d, j.created_by)
        return failed

    def _fail_waiting_deployment(self, s: Session, job: db.DockStatus, reason: str | None) -> None:
        """A deployment made with its model's import fails when the import does."""
        if job.action != JobAction.IMPORT or not job.deployment_id:
            return
        d = s.get(db.Deployment, job.deployment_id)
        if d is not None and d.status == DeploymentStatus.READY_TO_DEPLOY:
            d.status = DeploymentStatus.FAILED
            d.failure_reason = f"its model's import failed: {reason or 'unknown reason'}"
            self._access_changed.add(d.id)
            self._deployment_notice(s, d, job.created_by)

    # ---------------------------------------------------------------- deployments

    def _deployment(self, s: Session, deployment_id: str) -> db.Deployment:
        d = s.get(db.Deployment, deployment_id)
        if d is None:
            raise NotFound(f"deployment {deployment_id} not found")
        return d

    def find_deployment_by_name(self, model_id: str, name: str) -> dict[str, Any] | None:
        with self._tx() as s:
            d = self._named_deployment(s, model_id, name)
            return views.deployment(d) if d else None

    @staticmethod
    def _named_deployment(s: Session, model_id: str, name: str) -> db.Deployment | None:
        """The deployment of `model_id` named `name`. New names are unique per model, but a
        database of an older raydock may hold several: the newest, on every database alike."""
        q = (
            select(db.Deployment)
            .where(db.Deployment.model_id == model_id, db.Deployment.name == name)
            .order_by(db.Deployment.added_on.desc(), db.Deployment.id.desc())
            .limit(1)
        )
        return s.scalar(q)

    def _refuse_taken_name(self, s: Session, model_id: str, name: str) -> None:
        """409 when a deployment of the model has that name already, whatever its status:
        apply, rollback and the deploy route's isDeployedPreviously find deployments by name,
        and `raydock get` writes files that apply would refuse. Checked here, not by a unique
        index: older databases may hold duplicates, and the registry is the only writer."""
        taken = self._named_deployment(s, model_id, name)
        if taken is not None:
            raise Conflict(
                f'name: model {model_id} already has a deployment named "{name}" '
                f"({taken.id}, {taken.status}); choose another name, or redeploy that one",
                "name",
                "duplicate_name",
            )

    def create_deployment(
        self, model_id: str, body: dict[str, Any], user_id: str, awaiting_import: bool = False
    ) -> dict[str, Any]:
        """A READY_TO_DEPLOY deployment of a READY model, or (`awaiting_import`) of one being
        imported, which the lifecycle deploys when the import ends."""
        with self._tx() as s:
            d = self._add_deployment(s, self._model(s, model_id), body, user_id, awaiting_import)
            return views.deployment(d, self._user_names(s))

    def _add_deployment(
        self, s: Session, m: db.Model, body: dict[str, Any], user_id: str, awaiting_import: bool
    ) -> db.Deployment:
        problem = undeployable_model(m.id, m.status)
        if problem and not (awaiting_import and m.status in IMPORTING_MODEL):
            raise Conflict(problem)
        self._refuse_taken_name(s, m.id, body["name"])
        d = db.Deployment(
            id=db.new_id(names.DEPLOYMENT_ID_PREFIX),
            model_id=m.id,
            name=body["name"],
            status=DeploymentStatus.READY_TO_DEPLOY,
            config=body,
            description=body.get("description", ""),
            tags=body.get("tags", []),
            timeout_s=body.get("timeout", params.TIMEOUT_S.default),
            added_by=user_id,
        )
        s.add(d)
        s.flush()
        self._access_changed.add(d.id)
        return d

    def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        with self._tx() as s:
            return views.deployment(self._deployment(s, deployment_id), self._user_names(s))

    def list_deployments(self, model_id: str | None = None) -> list[dict[str, Any]]:
        with self._tx() as s:
            q = select(db.Deployment).order_by(db.Deployment.added_on)
            if model_id:
                self._model(s, model_id)
                q = q.where(db.Deployment.model_id == model_id)
            names = self._user_names(s)
            return [views.deployment(d, names) for d in s.scalars(q)]

    def update_deployment(self, deployment_id: str, **fields: Any) -> dict[str, Any]:
        with self._tx() as s:
            d = self._deployment(s, deployment_id)
            changed = {k: v for k, v in fields.items() if v is not None}
            if "name" in changed and changed["name"] != d.name:  # the API offers no rename
                self._refuse_taken_name(s, d.model_id, changed["name"])
            for k, v in changed.items():
                setattr(d, {"timeout": "timeout_s"}.get(k, k), v)
            # the configuration holds them too: a redeploy from it, an export, the history
            d.config = {**(d.config or {}), **changed}
            self._access_changed.add(d.id)
            return views.deployment(d, self._user_names(s))

    def set_applied_from(self, deployment_id: str, source: str | None) -> None:
        """Mark a deployment as managed by `raydock apply` from `source` (None: by hand)."""
        with self._tx() as s:
            self._deployment(s, deployment_id).applied_from = source

    def begin_deploy(
        self, deployment_id: str, config: dict[str, Any] | None, user_id: str, status: str
    ) -> dict[str, Any]:
        """Move to DEPLOYING/OPTIMIZING, store the new config, open the next history version
        and create the deploy job, all in one transaction; returns the job."""
        with self._tx() as s:
            d = self._deployment(s, deployment_id)
            if d.status in STARTING_DEPLOYMENT:
                raise Conflict(f"deployment {deployment_id} is already {d.status}")
            problem = undeployable_model(d.model_id, self._model(s, d.model_id).status)
            if problem:  # e.g. a re-trigger after its import failed
                raise Conflict(problem)
            if self._undeploying(s, d.id):
                raise Conflict(f"deployment {deployment_id} is being undeployed; deploy it after")
            check_deployment(d.status, status)
            if config is not None:
                d.config = config
                d.timeout_s = config.get("timeout", d.timeout_s)
                d.description = config.get("description", d.description)
                d.tags = config.get("tags", d.tags)
            d.status, d.failure_reason = status, None
            self._access_changed.add(d.id)
            self._add_version(s, d, user_id)
            return self._add_job(s, JobAction.DEPLOY, d.model_id, user_id, d.id)

    @staticmethod
    def _add_version(s: Session, d: db.Deployment, deployed_by: str | None, **fields: Any) -> None:
        """The deployment's next history version (`name_vN`), of its current configuration."""
        n = (
            s.scalar(
                select(func.max(db.DeploymentVersion.version)).where(
                    db.DeploymentVersion.deployment_id == d.id
                )
            )
            or 0
        )
        s.add(
            db.DeploymentVersion(
                deployment_id=d.id,
                version=n + 1,
                name=f"{d.name}_v{n + 1}",
                config=d.config,
                deployed_by=deployed_by,
                **fields,
            )
        )

    def begin_undeploy(self, deployment_id: str, user_id: str) -> dict[str, Any]:
        """Create the undeploy job of a deployment that may be undeployed; returns the job."""
        with self._tx() as s:
            d = self._deployment(s, deployment_id)
            if d.status not in UNDEPLOYABLE_DEPLOYMENT:
                allowed = ", ".join(sorted(UNDEPLOYABLE_DEPLOYMENT))
                raise Conflict(f"deployment is {d.status}; only {allowed} can be undeployed")
            if self._undeploying(s, d.id):
                raise Conflict(f"deployment {deployment_id} is already being undeployed")
            return self._add_job(s, JobAction.UNDEPLOY, d.model_id, user_id, d.id)

    def cancel_deploy(self, deployment_id: str, user_id: str) -> None:
        """An undeploy came while the deployment was starting: its deploy job and the
        version it was starting end FAILED, saying who cancelled them (no-op otherwise)."""
        with self._tx() as s:
            jobs = self._running_jobs(s, deployment_id, JobAction.DEPLOY)
            if not jobs:
                return
            reason = f"cancelled: undeployed by {self._user_names(s).get(user_id, user_id)}"
            for j in jobs:
                self._end_job(j, JobStatus.FAILED, reason)
            _, live = self._last_two_versions(s, deployment_id)
            self._stopped(live, user_id)  # a redeploy's: the live replicas go with it
            self._end_version(s, deployment_id, "FAILED", reason)

    @staticmethod
    def _running_jobs(s: Session, deployment_id: str, action: str) -> list[db.DockStatus]:
        """The deployment's jobs of `action` still IN_PROGRESS."""
        running = select(db.DockStatus).where(
            db.DockStatus.deployment_id == deployment_id,
            db.DockStatus.action == action,
            db.DockStatus.status == JobStatus.IN_PROGRESS,
        )
        return list(s.scalars(running))

    @staticmethod
    def _undeploying(s: Session, deployment_id: str) -> bool:
        return bool(Registry._running_jobs(s, deployment_id, JobAction.UNDEPLOY))

    def _end_version(self, s: Session, deployment_id: str, result: str, reason: str | None) -> None:
        v = Registry._latest_version(s, deployment_id)
        if v is not None and v.ended_at is None:
            v.ended_at, v.result, v.failure_reason = db.utcnow(), result, reason

    def set_deployment_status(
        self,
        deployment_id: str,
        status: str,
        reason: str | None = None,
        only_from: str | None = None,
        job_id: str | None = None,
        job_message: str | None = None,
    ) -> dict[str, Any] | None:
        """`only_from`: change it only while it is still in that status (else None): for a
        change decided on what it was, when a user's own action may have moved it since.
        `job_id`: the deploy job that ends with this DEPLOYED, in the same step (`job_message`
        its message): a lifecycle dying between two writes would leave a serving deployment
        whose job reconciliation then fails as interrupted."""
        with self._tx() as s:
            d = self._deployment(s, deployment_id)
            if only_from is not None and d.status != only_from:
                return None
            check_deployment(d.status, status)
            if job_id is not None:
                if status != DeploymentStatus.DEPLOYED:
                    raise ValueError("a job ends with its deployment only when it is DEPLOYED")
                self._end_job(self._job(s, job_id), JobStatus.SUCCESS, job_message)
            changed = d.status != status
            lost = d.status == DeploymentStatus.DEPLOYED and status == DeploymentStatus.FAILED
            if d.status in STARTING_DEPLOYMENT and status == DeploymentStatus.FAILED:
                # a redeploy that failed with its app deleted: the live version ended too
                self._stopped(self._last_two_versions(s, d.id)[1])
            d.status = status
            self._access_changed.add(d.id)
            d.failure_reason = reason if status == DeploymentStatus.FAILED else None
            if status == DeploymentStatus.DEPLOYED:
                self._end_version(s, d.id, "SUCCESS", None)
            elif status == DeploymentStatus.FAILED:
                self._end_version(s, d.id, "FAILED", reason)
            if lost:  # its app is gone (restores failed): the live version's replicas ended
                self._stopped(self._latest_version(s, d.id))
            if changed:
                self._deployment_notice(s, d)
            return views.deployment(d, self._user_names(s))

    def live_version(self, deployment_id: str) -> dict[str, Any] | None:
        """The version a starting redeploy replaces, while it counts as live ({"name",
        "config"}), or None (a first deploy, or the version before was not serving)."""
        with self._tx() as s:
            if self._deployment(s, deployment_id).status not in STARTING_DEPLOYMENT:
                return None
            _, previous = self._last_two_versions(s, deployment_id)
            return None if previous is None else {"name": previous.name, "config": previous.config}

    def keep_live_version(self, deployment_id: str, reason: str) -> str | None:
        """A redeploy failed (a conversion, a merge or a plan refused; or its replicas did
        not start, and the lifecycle ran the live version's app again): the version that
        was serving goes on serving. The failed
        version ends FAILED with `reason`, a new one records the live configuration again
        (with the redeploy's description, tags and timeout, which need no redeploy) and the
        deployment is DEPLOYED. Returns the name of the version kept, or None when none was
        live (the deployment then fails as any deploy does)."""
        with self._tx() as s:
            d = self._deployment(s, deployment_id)
            if d.status not in STARTING_DEPLOYMENT:
                return None
            return self._keep_live(s, d, reason)

    def _keep_live(self, s: Session, d: db.Deployment, reason: str) -> str | None:
        latest, previous = self._last_two_versions(s, d.id)
        if previous is None:
            return None
        self._end_version(s, d.id, "FAILED", reason)
        edits = {k: d.config[k] for k in schemas.EDITABLE_FIELDS if k in (d.config or {})}
        d.config = {**previous.config, **edits}
        check_deployment(d.status, DeploymentStatus.DEPLOYED)
        d.status, d.failure_reason = DeploymentStatus.DEPLOYED, None
        now = db.utcnow()
        self._add_version(s, d, latest.deployed_by, started_at=now, ended_at=now, result="SUCCESS")
        self._access_changed.add(d.id)
        kept = previous.name
        fields = {"deploymentId": d.id, "deploymentName": d.name, "modelId": d.model_id}
        fields["reason"] = f"{reason} ({kept}'s configuration goes on serving)"
        from raydock.platform import notify

        self._notices.append((notify.DEPLOY_FAILED, latest.deployed_by, fields))
        return kept

    @staticmethod
    def _stopped(v: db.DeploymentVersion | None, by: str | None = None) -> None:
        """A version's replicas ended: by `by`'s undeploy, or with no undeploy (its app lost
        or deleted); a version already stopped keeps its stamps."""
        if v is not None and v.undeploy_started_at is None:
            v.undeploy_started_at = v.undeploy_ended_at = db.utcnow()
            if by is not None:
                v.undeployed_by = by

    def record_undeploy(self, deployment_id: str, user_id: str | None, ended: bool) -> None:
        """Stamp who undeployed the live version, and when it started / ended."""
        with self._tx() as s:
            v = Registry._latest_version(s, deployment_id)
            if v is None:
                return
            if not ended:
                v.undeployed_by, v.undeploy_started_at = user_id, db.utcnow()
                v.undeploy_ended_at = None
            else:
                v.undeploy_ended_at = db.utcnow()

    def history(self, deployment_id: str) -> list[dict[str, Any]]:
        """Every version, oldest first (rollback and apply read them all; the API pages)."""
        return self.history_page(deployment_id, None)["versions"]

    def history_page(
        self, deployment_id: str, limit: int | None, offset: int = 0
    ) -> dict[str, Any]:
        """`limit` versions (None: all) from `offset`, oldest first, the newest marked
        `latest`, and `total`: how many versions the deployment has."""
        V = db.DeploymentVersion
        with self._tx() as s:
            self._deployment(s, deployment_id)
            of_it = V.deployment_id == deployment_id
            page = select(V).where(of_it).order_by(V.version, V.id).offset(offset).limit(limit)
            counted = select(func.count(V.id), func.max(V.version)).where(of_it)
            total, newest = s.execute(counted).one()
            names = self._user_names(s)
            versions = [
                views.version(v, names) | {"latest": v.version == newest} for v in s.scalars(page)
            ]
            return {"versions": versions, "total": total}

    def _delete_deployment_rows(self, s: Session, deployment_id: str) -> None:
        self._access_changed.add(deployment_id)
        s.execute(delete(db.ApiKey).where(db.ApiKey.deployment_id == deployment_id))
        s.execute(
            delete(db.DeploymentVersion).where(db.DeploymentVersion.deployment_id == deployment_id)
        )
        s.execute(delete(db.Deployment).where(db.Deployment.id == deployment_id))

    def delete_deployment(self, deployment_id: str) -> None:
        with self._tx() as s:
            d = self._deployment(s, deployment_id)
            if d.status not in DELETABLE_DEPLOYMENT:
                allowed = ", ".join(sorted(DELETABLE_DEPLOYMENT))
                raise Conflict(f"deployment is {d.status}; only {allowed} can be deleted")
            self._delete_deployment_rows(s, deployment_id)

    def deployments_in(self, statuses: list[str]) -> list[dict[str, Any]]:
        with self._tx() as s:
            q = select(db.Deployment).where(db.Deployment.status.in_(statuses))
            return [views.deployment(d) for d in s.scalars(q)]

    # ---------------------------------------------------------------- API keys

    @staticmethod
    def _key_row(
        key: str, name: str, scope: str, deployment_id: str | None, user_id: str | None, by: str
    ) -> db.ApiKey:
        return db.ApiKey(
            id=db.new_id("key"),
            key_hash=security.hash_key(key),
            prefix=security.display_prefix(key),
            name=name[:200],  # "<user name> (management)" may pass the column's 200
            scope=scope,
            deployment_id=deployment_id,
            user_id=user_id,
            created_by=by,
        )

    def create_deployment_key(
        self,
        deployment_id: str,
        name: str,
        user_id: str,
        limits: dict[str, int | None] | None = None,
    ) -> dict[str, Any]:
        with self._tx() as s:
            self._deployment(s, deployment_id)
            # apply and `raydock get` know a deployment's keys by name (older databases may
            # hold duplicates; new ones are refused here, by the only writer)
            taken = select(db.ApiKey.id).where(
                db.ApiKey.deployment_id == deployment_id, db.ApiKey.name == name[:200]
            )
            if s.scalar(taken.limit(1)) is not None:
                raise Conflict(
                    f'name: deployment {deployment_id} already has an API key named "{name}"; '
                    "choose another name (or delete that key first)",
                    "name",
                    "duplicate_name",
                )
            key = security.new_key(security.DEPLOYMENT_PREFIX)
            row = self._key_row(key, name, "deployment", deployment_id, None, user_id)
            self._access_changed.add(deployment_id)
            s.add(row)
            s.flush()
            self._store_limits(s, row.id, limits or {})
            view = views.api_key(row, self._user_names(s), self._limits_of(s, [row.id]))
            return {**view, "apiKey": key}

    def list_deployment_keys(self, deployment_id: str) -> list[dict[str, Any]]:
        with self._tx() as s:
            self._deployment(s, deployment_id)
            q = select(db.ApiKey).where(db.ApiKey.deployment_id == deployment_id)
            rows = s.scalars(q.order_by(db.ApiKey.created_at)).all()
            names, limits = self._user_names(s), self._limits_of(s, [k.id for k in rows])
            return [views.api_key(k, names, limits) for k in rows]

    def set_key_limits(
        self, deployment_id: str, key_id: str, limits: dict[str, int | None]
    ) -> dict[str, Any]:
        """Change a key's limits (a field given as None removes that limit; one left out
        stays); every replica applies them within a second (the access snapshot)."""
        with self._tx() as s:
            k = s.get(db.ApiKey, key_id)
            if k is None or k.deployment_id != deployment_id:
                raise NotFound(f"API key {key_id} not found on deployment {deployment_id}")
            current = self._limits_of(s, [key_id]).get(key_id, {})
            self._store_limits(s, key_id, {**current, **limits})
            self._access_changed.add(deployment_id)
            return views.api_key(k, self._user_names(s), self._limits_of(s, [key_id]))

    @staticmethod
    def _store_limits(s: Session, key_id: str, limits: dict[str, int | None]) -> None:
        row = s.get(db.KeyLimits, key_id)
        values = {
            "requests_per_minute": limits.get("requestsPerMinute"),
            "tokens_per_minute": limits.get("tokensPerMinute"),
            "tokens_per_day": limits.get("tokensPerDay"),
        }
        if not any(values.values()):
            if row is not None:
                s.delete(row)
            return
        if row is None:
            s.add(db.KeyLimits(key_id=key_id, **values))
        else:
            for field, value in values.items():
                setattr(row, field, value)

    @staticmethod
    def _limits_of(s: Session, key_ids: list[str]) -> dict[str, dict[str, int]]:
        """key id -> its limits (only those set), for the keys that have any."""
        if not key_ids:
            return {}
        rows = s.scalars(select(db.KeyLimits).where(db.KeyLimits.key_id.in_(key_ids)))
        out = {}
        for r in rows:
            set_ = {
                "requestsPerMinute": r.requests_per_minute,
                "tokensPerMinute": r.tokens_per_minute,
                "tokensPerDay": r.tokens_per_day,
            }
            out[r.key_id] = {name: v for name, v in set_.items() if v}
        return out

    def delete_deployment_key(self, deployment_id: str, key_id: str) -> None:
        with self._tx() as s:
            k = s.get(db.ApiKey, key_id)
            if k is None or k.deployment_id != deployment_id:
                raise NotFound(f"API key {key_id} not found on deployment {deployment_id}")
            self._access_changed.add(deployment_id)
            s.delete(k)

    def touch_keys(self, key_ids: list[str]) -> None:
        with self._tx() as s:
            now = db.utcnow()
            for k in s.scalars(select(db.ApiKey).where(db.ApiKey.id.in_(key_ids))):
                k.last_used_at = now

    # ---------------------------------------------------------------- usage (the meter's)

    def record_usage(self, rows: list[tuple[int, str, str, str, int, int, int]]) -> None:
        """Add (minute epoch s, deployment, adapter, key, requests, prompt, completion) rows."""
        with self._tx() as s:
            for minute, dep, adapter, key, requests, prompt, completion in rows:
                at = datetime.fromtimestamp(minute, UTC).replace(tzinfo=None)
                row = s.get(db.Usage, (at, dep, adapter, key))
                if row is None:
                    row = db.Usage(
                        minute=at,
                        deployment_id=dep,
                        adapter_id=adapter,
                        key_id=key,
                        requests=0,
                        prompt_tokens=0,
                        completion_tokens=0,
                    )
                    s.add(row)
                row.requests += requests
                row.prompt_tokens += prompt
                row.completion_tokens += completion

    def usage_rows(
        self,
        start: datetime | None = None,
        end: datetime | None = None,
        deployment_id: str | None = None,
        key_id: str | None = None,
        by: str = "minute",
    ) -> list[dict[str, Any]]:
        """Stored usage in [start, end) summed per period (`by`: minute, hour, day, or
        "total": over everything), deployment, adapter and key, by the database itself (a
        year of a busy key's minutes read into this actor blocked it for seconds), with the
        names of keys, deployments and adapters that still exist."""
        U = db.Usage
        with self._tx() as s:
            period = _usage_period(s.bind.dialect.name, by)
            columns = [U.deployment_id, U.adapter_id, U.key_id]
            sums = [func.sum(U.requests), func.sum(U.prompt_tokens), func.sum(U.completion_tokens)]
            grouping = columns if period is None else [period, *columns]
            q = select(*grouping, *sums)
            if start is not None:
                q = q.where(U.minute >= start)
            if end is not None:
                q = q.where(U.minute < end)
            if deployment_id:
                q = q.where(U.deployment_id == deployment_id)
            if key_id:
                q = q.where(U.key_id == key_id)
            found = s.execute(q.group_by(*grouping).order_by(*grouping)).all()
            rows = [(None, *r) if period is None else tuple(r) for r in found]
            names_of = self._names_of(s, rows)
            return [views.usage(r, *names_of) for r in rows]

    @staticmethod
    def _names_of(s: Session, rows: list[tuple]) -> tuple[dict[str, str], ...]:
        """Names of the deployments, adapters and keys these usage rows name."""

        def names(model: Any, ids: set[str]) -> dict[str, str]:
            ids.discard("")
            if not ids:
                return {}
            return {
                i: n for i, n in s.execute(select(model.id, model.name).where(model.id.in_(ids)))
            }

        return (
            names(db.Deployment, {r[1] for r in rows}),
            names(db.Model, {r[2] for r in rows}),
            names(db.ApiKey, {r[3] for r in rows}),
        )

    def tokens_since(self, start: datetime) -> dict[str, int]:
        """Tokens each key used since `start` (a restarted meter's daily budgets)."""
        with self._tx() as s:
            total = func.sum(db.Usage.prompt_tokens + db.Usage.completion_tokens)
            q = select(db.Usage.key_id, total).where(db.Usage.minute >= start)
            return {key: int(n or 0) for key, n in s.execute(q.group_by(db.Usage.key_id))}

    def prune_history(self, before: dict[str, datetime | None]) -> dict[str, int]:
        """Retention: delete what was recorded before `before[kind]` (naive UTC; None or
        absent keeps it) of each kind: `usage` minutes, `deliveries` delivered or failed
        (pending ones stay: the notifier may still be retrying them), `jobs` that ended
        (the import jobs of a model that still exists stay: a retry and a failed import's
        notice read its latest one). Returns how many of each went."""
        Job, Delivery = db.DockStatus, db.NotificationDelivery
        queries = {
            "usage": lambda t: delete(db.Usage).where(db.Usage.minute < t),
            "deliveries": lambda t: delete(Delivery).where(
                Delivery.status != "pending", Delivery.created_at < t
            ),
            "jobs": lambda t: delete(Job).where(
                Job.status != JobStatus.IN_PROGRESS,
                Job.created_at < t,
                ~((Job.action == JobAction.IMPORT) & Job.model_id.in_(select(db.Model.id))),
            ),
        }
        gone = dict.fromkeys(queries, 0)
        with self._tx() as s:
            for kind, query in queries.items():
                if before.get(kind) is not None:
                    gone[kind] = s.execute(query(before[kind])).rowcount
        return gone

    # ---------------------------------------------------------------- chunked uploads

    def create_upload_session(self, fields: dict[str, Any], user_id: str) -> dict[str, Any]:
        with self._tx() as s:
            u = db.UploadSession(
                id=db.new_id("up"),
                file_name=fields["fileName"],
                total_size=fields["totalSize"],
                total_chunks=fields["totalChunks"],
                options={k: fields.get(k) for k in ("kind", "baseModelId", "description", "tags")},
                created_by=user_id,
            )
            s.add(u)
            s.flush()
            return self._upload_view(u, [])

    @staticmethod
    def _upload(s: Session, session_id: str) -> tuple[db.UploadSession, list[int]]:
        """A session and its received chunk numbers, sorted, in one query; NotFound if there
        is none. The numbers come joined into one text by the database: every chunk's answer
        holds them all, and thousands of rows read one by one cost more per chunk than the
        JSON list they replace."""
        number = db.UploadChunk.chunk_number
        if s.bind.dialect.name == "postgresql":
            joined = func.string_agg(cast(number, Text), ",")
        else:
            joined = func.group_concat(number, ",")
        session = db.UploadSession
        received = select(joined).where(db.UploadChunk.session_id == session.id)
        q = select(session, received.scalar_subquery()).where(session.id == session_id)
        found = s.execute(q).first()
        if found is None:
            raise NotFound(f"upload session {session_id} not found")
        u, text = found
        return u, sorted(map(int, text.split(","))) if text else []

    @staticmethod
    def _upload_view(u: db.UploadSession, received: list[int]) -> dict[str, Any]:
        return {
            "sessionId": u.id,
            "fileName": u.file_name,
            "totalSize": u.total_size,
            "totalChunks": u.total_chunks,
            "receivedChunks": received,
            "options": u.options,
            "createdBy": u.created_by,
        }

    def get_upload_session(self, session_id: str) -> dict[str, Any]:
        with self._tx() as s:
            return self._upload_view(*self._upload(s, session_id))

    def add_upload_chunk(self, session_id: str, chunk: int) -> dict[str, Any]:
        """Record a chunk as received: one row, once (a chunk sent again is the same chunk)."""
        with self._tx() as s:
            u, received = self._upload(s, session_id)
            _insert_unless_there(s, db.UploadChunk, session_id=session_id, chunk_number=chunk)
            return self._upload_view(u, sorted({*received, chunk}))

    def list_upload_sessions(self) -> list[dict[str, Any]]:
        """Every open session, oldest first: its id, file, size, chunks received and who
        started it when (`startedAt` in epoch seconds: for the idle sweep, and the disk space
        a new session must leave to the open ones)."""
        session, chunk = db.UploadSession, db.UploadChunk
        received = select(func.count()).where(chunk.session_id == session.id).scalar_subquery()
        with self._tx() as s:
            names = self._user_names(s)
            rows = s.execute(select(session, received).order_by(session.created_at))
            return [
                {
                    "sessionId": u.id,
                    "fileName": u.file_name,
                    "totalSize": u.total_size,
                    "totalChunks": u.total_chunks,
                    "chunksReceived": chunks,
                    "createdBy": u.created_by,
                    "createdByName": names.get(u.created_by or "", u.created_by),
                    "createdAt": views.iso(u.created_at),
                    "startedAt": u.created_at.replace(tzinfo=UTC).timestamp(),
                }
                for u, chunks in rows
            ]

    def delete_upload_session(self, session_id: str) -> None:
        """The session ends; its chunks' rows go with it (the foreign key cascades)."""
        with self._tx() as s:
            s.execute(delete(db.UploadSession).where(db.UploadSession.id == session_id))

    # ---------------------------------------------------------------- Hugging Face connections

    def _box(self) -> SecretBox:
        if self._secrets is None:
            raise RuntimeError("this registry was started without the platform's secret key")
        return self._secrets

    def _connection(self, s: Session, connection_id: str) -> db.HfConnection:
        c = s.get(db.HfConnection, connection_id)
        if c is None:
            raise NotFound(f"connection {connection_id} not found")
        return c

    def create_connection(
        self, name: str, token: str, user_id: str, hf_user: str | None
    ) -> dict[str, Any]:
        """Store a token sealed; `hf_user`: who it authenticated as when checked."""
        with self._tx() as s:
            if s.scalar(select(db.HfConnection).where(db.HfConnection.name == name)):
                raise Conflict(f"a connection named {name!r} exists; choose another name")
            c = db.HfConnection(
                id=db.new_id("hfc"),
                name=name,
                token_sealed=self._box().seal(token),
                hf_user=hf_user,
                last_test_ok=hf_user is not None or None,
                last_test_message="authenticated" if hf_user else None,
                last_tested_at=db.utcnow() if hf_user else None,
                created_by=user_id,
            )
            s.add(c)
            s.flush()
            return views.connection(c, self._user_names(s))

    def list_connections(self) -> list[dict[str, Any]]:
        with self._tx() as s:
            users = self._user_names(s)
            q = select(db.HfConnection).order_by(db.HfConnection.created_at)
            return [views.connection(c, users) for c in s.scalars(q)]

    def get_connection(self, connection_id: str) -> dict[str, Any]:
        with self._tx() as s:
            return views.connection(self._connection(s, connection_id), self._user_names(s))

    def connection_token(self, connection_id: str) -> str:
        """The token itself, for the control plane's own calls to the Hub: never an API's."""
        with self._tx() as s:
            return self._box().open(self._connection(s, connection_id).token_sealed)

    def record_connection_test(
        self, connection_id: str, ok: bool, message: str, hf_user: str | None
    ) -> dict[str, Any]:
        with self._tx() as s:
            c = self._connection(s, connection_id)
            c.last_test_ok, c.last_test_message, c.last_tested_at = ok, message, db.utcnow()
            if hf_user:
                c.hf_user = hf_user
            return views.connection(c, self._user_names(s))

    def delete_connection(self, connection_id: str) -> None:
        with self._tx() as s:
            s.delete(self._connection(s, connection_id))

    # ---- notifications (platform/notify.py): events told once their transaction commits,
    # the deliveries the notifier records, users' own webhooks

    def _emit_notices(self) -> None:
        from raydock.platform import notify

        notices, self._notices = self._notices, []
        for kind, user_id, fields in notices:
            notify.emit(kind, user_id, **fields)

    def _import_failed_notice(self, s: Session, m: db.Model, user_id: str | None = None) -> None:
        """Tell who started a model's import (its latest import job's creator) that it failed."""
        from raydock.platform import notify

        if user_id is None:
            job = s.scalar(
                select(db.DockStatus)
                .where(db.DockStatus.model_id == m.id, db.DockStatus.action == JobAction.IMPORT)
                .order_by(db.DockStatus.created_at.desc())
            )
            user_id = job.created_by if job is not None else m.created_by
        fields = {"modelId": m.id, "modelName": m.name, "error": m.error}
        self._notices.append((notify.IMPORT_FAILED, user_id, fields))

    def _deployment_notice(self, s: Session, d: db.Deployment, user_id: str | None = None) -> None:
        """Tell who deployed (or undeployed) a deployment that it is now DEPLOYED, FAILED or
        UNDEPLOYED; other states tell nobody."""
        from raydock.platform import notify

        kind = {
            DeploymentStatus.DEPLOYED: notify.DEPLOYED,
            DeploymentStatus.FAILED: notify.DEPLOY_FAILED,
            DeploymentStatus.UNDEPLOYED: notify.UNDEPLOYED,
        }.get(d.status)
        if kind is None:
            return
        if user_id is None:
            v = Registry._latest_version(s, d.id)
            if v is not None:
                undeployed = d.status == DeploymentStatus.UNDEPLOYED
                user_id = v.undeployed_by if undeployed else v.deployed_by
            user_id = user_id or d.added_by
        fields = {"deploymentId": d.id, "deploymentName": d.name, "modelId": d.model_id}
        if d.status == DeploymentStatus.FAILED:
            fields["reason"] = d.failure_reason
        self._notices.append((kind, user_id, fields))

    def notification_targets(self, user_id: str | None, key_id: str | None = None) -> dict:
        """Where an event goes besides the platform's addresses: its user's email and own
        webhook (its URL and secret opened: for the notifier's delivery and signing only,
        never an API's). A key event without a user goes to the key's creator; `fields`: the
        names it lacks."""
        fields: dict[str, Any] = {}
        with self._tx() as s:
            k = s.get(db.ApiKey, key_id) if key_id else None
            if k is not None:
                user_id = user_id or k.created_by
                fields["keyName"] = k.name
                d = s.get(db.Deployment, k.deployment_id) if k.deployment_id else None
                if d is not None:
                    fields.update(deploymentId=d.id, deploymentName=d.name)
            u = s.get(db.User, user_id) if user_id else None
            hook = s.get(db.UserWebhook, user_id) if u is not None else None
            webhook = None
            if hook is not None and self._secrets is not None:
                try:
                    webhook = {
                        "url": self._webhook_url(hook),
                        "secret": self._secrets.open(hook.secret_sealed),
                    }
                except SecretUnreadable:  # the platform key changed: set the webhook again
                    webhook = None
            email = u.email if u is not None else None
            return {"userId": user_id, "email": email, "webhook": webhook, "fields": fields}

    def record_delivery(self, event: dict[str, Any], channel: str, target: str) -> dict:
        """A delivery about to be attempted (pending), its target recorded as every API
        shows it: a webhook's URL masked (notify.display_target), never in clear."""
        from raydock.platform import notify

        with self._tx() as s:
            row = db.NotificationDelivery(
                id=db.new_id("nd"),
                kind=event["kind"],
                event=event,
                user_id=event.get("userId"),
                channel=channel,
                target=notify.display_target(target),
                status="pending",
                attempts=0,
            )
            s.add(row)
            s.flush()
            return self._delivery_view(row)

    def update_delivery(
        self, delivery_id: str, status: str, attempts: int, error: str | None
    ) -> None:
        with self._tx() as s:
            row = s.get(db.NotificationDelivery, delivery_id)
            if row is None:
                return
            row.status, row.attempts = status, attempts
            if error is not None:
                row.last_error = error
            if status == "delivered":
                row.delivered_at = db.utcnow()

    def pending_deliveries(self, before: datetime) -> list[dict[str, Any]]:
        """The deliveries still pending from before `before` (UTC), oldest first, with what
        the notifier needs to go on with them: the event, channel, target (a URL masked, as
        recorded: the notifier finds the URL among the event's targets), attempts."""
        with self._tx() as s:
            q = select(db.NotificationDelivery).where(
                db.NotificationDelivery.status == "pending",
                db.NotificationDelivery.created_at < before,
            )
            order = (db.NotificationDelivery.created_at, db.NotificationDelivery.id)
            return [
                {
                    "deliveryId": r.id,
                    "event": r.event,
                    "channel": r.channel,
                    "target": r.target,
                    "attempts": r.attempts,
                }
                for r in s.scalars(q.order_by(*order))
            ]

    def list_deliveries(
        self, kind: str | None = None, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Newest first (every user's)."""
        return self.deliveries_page(kind, status, limit)["deliveries"]

    def deliveries_page(
        self,
        kind: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
        own: tuple[str, list[str]] | None = None,
    ) -> dict[str, Any]:
        """`limit` deliveries from `offset`, newest first, and `total`: how many match.
        `own`: (a user's id, their targets as deliveries show them): only the deliveries of
        that user's events to those targets."""
        row = db.NotificationDelivery
        with self._tx() as s:
            match = []
            if kind:
                match.append(row.kind == kind)
            if status:
                match.append(row.status == status)
            if own is not None:
                user_id, targets = own
                match += [row.user_id == user_id, row.target.in_(targets)]
            q = select(row).where(*match).order_by(row.created_at.desc(), row.id)
            found = [self._delivery_view(r) for r in s.scalars(q.offset(offset).limit(limit))]
            total = s.scalar(select(func.count(row.id)).where(*match))
            return {"deliveries": found, "total": total}

    @staticmethod
    def _delivery_view(row: db.NotificationDelivery) -> dict[str, Any]:
        return {
            "deliveryId": row.id,
            "kind": row.kind,
            "channel": row.channel,
            "target": row.target,  # masked when recorded (revision 0003 masked older ones)
            "status": row.status,
            "attempts": row.attempts,
            "lastError": row.last_error,
            "event": row.event,
            "createdAt": views.iso(row.created_at),
            "updatedAt": views.iso(row.updated_at),
            "deliveredAt": views.iso(row.delivered_at),
        }

    def set_user_webhook(self, user_id: str, url: str) -> dict[str, Any]:
        """Set (or replace) a user's webhook with a new signing secret: returned here only.
        The URL is stored sealed and shown masked (`url`: notify.display_target), here too:
        it may be the receiver's credential."""
        import secrets

        from raydock.platform import notify

        secret = "rdwh-" + secrets.token_urlsafe(32)
        box = self._box()
        with self._tx() as s:
            hook = s.get(db.UserWebhook, user_id)
            if hook is None:
                hook = db.UserWebhook(user_id=user_id, secret_sealed="")
                s.add(hook)
            hook.url, hook.url_sealed = None, box.seal(url)
            hook.url_hint, hook.secret_sealed = notify.display_target(url), box.seal(secret)
            hook.created_at = db.utcnow()
            s.flush()
            return {"url": hook.url_hint, "secret": secret, "createdAt": views.iso(hook.created_at)}

    def get_user_webhook(self, user_id: str) -> dict[str, Any]:
        """A user's webhook as the API shows it: its URL masked (never its secret)."""
        with self._tx() as s:
            hook = s.get(db.UserWebhook, user_id)
            if hook is None:
                raise NotFound("no webhook is set for this user")
            return {"url": hook.url_hint, "createdAt": views.iso(hook.created_at)}

    def _webhook_url(self, hook: db.UserWebhook) -> str:
        """A webhook's URL opened (raises SecretUnreadable when the platform key changed);
        one not yet sealed (a registry without the key since the upgrade) as it is."""
        return self._box().open(hook.url_sealed) if hook.url_sealed else hook.url or ""

    def _seal_clear_webhooks(self) -> int:
        """Seal the webhook URLs raydocks before revision 0003 stored in clear (`url` into
        `url_sealed`, `url` emptied); returns how many. Here and not in that revision:
        migrations run without the platform key (`raydock db upgrade`, a restore,
        db.make_sessionmaker), while the registry `raydock up` starts always has it and runs
        this before anything reads a webhook. A registry without the key (tests) leaves
        them to the next one with it."""
        if self._secrets is None:
            return 0
        with self._tx() as s:
            q = select(db.UserWebhook).where(db.UserWebhook.url.is_not(None))
            clear = s.scalars(q).all()
            for hook in clear:
                hook.url_sealed, hook.url = self._secrets.seal(hook.url), None
            return len(clear)

    def delete_user_webhook(self, user_id: str) -> None:
        with self._tx() as s:
            hook = s.get(db.UserWebhook, user_id)
            if hook is None:
                raise NotFound("no webhook is set for this user")
            s.delete(hook)


__all__ = ["Registry", "NotFound", "Conflict", "InvalidTransition"]

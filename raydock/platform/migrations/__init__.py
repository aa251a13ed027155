"""The database schema's versions (Alembic), kept inside the package: no alembic.ini.

The registry brings its database to `head` when it starts (`db.make_sessionmaker(create=True)`,
under the platform lease); `raydock db upgrade|current|history` do the same by hand. A
database is one of:

- empty: every revision runs (0001 creates the schema);
- made before migrations existed (raydock's tables, no `alembic_version`): adopted when each
  table it has matches revision 0001's (the same columns). 0001 then creates only the tables it
  lacks (older raydocks had fewer) and later revisions run as usual;
- at a revision this raydock does not know (a newer raydock upgraded it): refused before
  anything is written, with a message naming that revision.

A schema change: edit db.py, then `python -m raydock.platform.migrations revision "what"`
writes the next revision from the difference (read it: autogenerate misses renames), and
tests/unit/test_migrations.py fails while db.py and the revisions disagree.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Connection, Engine

from raydock.platform import db

SCRIPT_LOCATION = Path(__file__).resolve().parent
BASELINE = "0001"  # the schema as migrations found it: pre-migration databases are adopted at it


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built here (`script_location` inside the package)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    return scripts().get_current_head()


def history() -> list[Script]:
    """Every revision, newest first."""
    return list(scripts().walk_revisions())


@dataclass
class State:
    revision: str | None  # the database's (None: no alembic_version)
    head: str  # this raydock's newest
    pending: list[str] = field(default_factory=list)  # what an upgrade would run, in order
    premigration: bool = False  # raydock's tables without a revision: adopted at BASELINE
    empty: bool = False  # none of raydock's tables


def _known(revision: str) -> bool:
    try:
        return scripts().get_revision(revision) is not None
    except CommandError:  # alembic.util's ResolutionError and friends
        return False


def state(conn: Connection) -> State:
    """Where the database stands; raises db.DatabaseRefused for a revision this raydock does
    not know, and for raydock's tables without a revision that revision 0001 does not match.
    Reads only."""
    revision = MigrationContext.configure(conn).get_current_revision()
    st = State(revision=revision, head=head())
    if revision is not None and not _known(revision):
        raise db.DatabaseRefused(
            f"the database is at schema revision {revision!r}, which this raydock does not know "
            f"(its newest is {st.head!r}): a newer raydock upgraded it; run that version, or "
            "restore a backup taken before the upgrade"
        )
    if revision is None:
        present = set(inspect(conn).get_table_names()) & set(db.Base.metadata.tables)
        st.empty = not present
        st.premigration = bool(present)
        if present:
            _check_adoptable(conn, present)
    st.pending = [
        s.revision for s in reversed(list(scripts().iterate_revisions("head", revision or "base")))
    ]
    return st


@functools.cache
def baseline_columns() -> dict[str, frozenset[str]]:
    """Table -> column names as revision 0001 makes them (run on an in-memory SQLite)."""
    engine = create_engine("sqlite://")
    with engine.begin() as conn:
        _run(conn, BASELINE)
        insp = inspect(conn)
        tables = set(insp.get_table_names()) - {"alembic_version"}
        return {t: frozenset(c["name"] for c in insp.get_columns(t)) for t in tables}


def _check_adoptable(conn: Connection, present: set[str]) -> None:
    baseline, insp, problems = baseline_columns(), inspect(conn), []
    for table in sorted(present):
        have = {c["name"] for c in insp.get_columns(table)}
        want = baseline.get(table)
        if want is None:
            problems.append(f"table {table} is not in revision {BASELINE}")
        elif have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            problems.append(
                f"table {table}"
                + (f" lacks {', '.join(missing)}" if missing else "")
                + (" and" if missing and extra else "")
                + (f" has unknown {', '.join(extra)}" if extra else "")
            )
    if problems:
        raise db.DatabaseRefused(
            "the database has raydock's tables but no schema revision, and they do not match "
            f"revision {BASELINE} ({'; '.join(problems)}): it cannot be adopted automatically"
        )


def _run(conn: Connection, target: str) -> None:
    """Upgrade to `target` on `conn` (Alembic's `command.upgrade` without re-reading the
    scripts each time)."""
    script = scripts()

    def upgrade_revs(rev, _context):
        return script._upgrade_revs(target, rev)

    with EnvironmentContext(config(conn), script, fn=upgrade_revs, destination_rev=target):
        script.run_env()


def upgrade(engine: Engine) -> tuple[State, str]:
    """Bring the database to head; returns (its state before, the revision now). Raises
    db.DatabaseRefused, having written nothing, for a database it cannot upgrade."""
    with engine.begin() as conn:
        before = state(conn)
        if before.pending:
            _run(conn, "head")
    return before, before.head


def current(engine: Engine) -> State:
    with engine.connect() as conn:
        return state(conn)

"""For developers: `python -m raydock.platform.migrations revision "what changed"` writes the
next revision from the difference between db.py and the revisions so far (autogenerate, run
against a scratch SQLite at head). Read what it wrote: renames come out as drop + add."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from raydock.platform import migrations


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "revision":
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{Path(tmp) / 'scratch.db'}")
        with engine.begin() as conn:
            migrations._run(conn, "head")
            cfg = migrations.config(conn)
            number = f"{len(migrations.history()) + 1:04d}"
            command.revision(cfg, message=argv[1], autogenerate=True, rev_id=number)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

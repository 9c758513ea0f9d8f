"""The ledger's schema, versioned with Alembic: every change to ``imagegate.ledger.metadata`` ships as a
revision in ``versions/`` (how to add one: README.md beside this file).

``upgrade`` brings any ledger to the newest revision: a fresh database is created, a ledger made before
migrations existed (tables created by ``metadata.create_all``, no ``alembic_version``) is stamped at
the baseline and upgraded in place, and a database at a revision this code does not know (written by
a newer imagegate) is refused. It runs under a lock so that replicas starting together upgrade once:
a PostgreSQL advisory lock held by the upgrade's own transaction (DDL is transactional there), a file
lock beside a SQLite database.

Alembic is imported only when there is something to do: a server restarting on an up-to-date ledger
checks its revision with one query (``is_current``).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, MetaData, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent
# Alembic announces each of its plugins at INFO on every run; what the upgrade does stays at INFO.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
# The revision that describes the schema ledgers had before migrations existed.
BASELINE = "0001"
# Tables every pre-migrations ledger has (``metadata.create_all`` made them all at once).
BASELINE_TABLES = frozenset({"generations", "payments"})
# pg_advisory_xact_lock key: any constant unique to imagegate's upgrades (ASCII "imggate").
ADVISORY_LOCK_KEY = 0x696D6767617465


class SchemaError(RuntimeError):
    """The ledger's schema cannot be used or upgraded by this version of imagegate."""


@dataclass(frozen=True)
class UpgradeReport:
    before: str | None
    after: str
    # A pre-migrations ledger was adopted (stamped at the baseline) before upgrading.
    adopted: bool

    @property
    def changed(self) -> bool:
        return self.adopted or self.before != self.after


def schema() -> MetaData:
    """The whole ledger schema: ``ledger.metadata`` with the tables other modules keep on it."""
    import imagegate.jobs.store  # noqa: F401  (jobs, job events, webhook deliveries)
    from imagegate.ledger import metadata

    return metadata


def newest_revision() -> str:
    """The newest revision shipped, read from the file names (``NNNN_*.py``, numbered in order, one line
    of history): known without loading Alembic. A test checks that Alembic agrees."""
    versions = (MIGRATIONS_DIR / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
    return max(path.name.split("_", 1)[0] for path in versions)


async def is_current(engine: AsyncEngine) -> bool:
    """Whether the ledger is at ``newest_revision()``, in one query."""
    async with engine.connect() as connection:
        if not await connection.run_sync(lambda sync: inspect(sync).has_table("alembic_version")):
            return False
        versions = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
    return list(versions) == [newest_revision()]


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_locations", str(MIGRATIONS_DIR / "versions"))
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise SchemaError("imagegate ships no ledger migrations")
    return head


async def upgrade(engine: AsyncEngine) -> UpgradeReport:
    """Bring the ledger to the newest revision (see the module docstring)."""
    async with _upgrade_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # A big table's migration may outlast the ledger's everyday timeouts; waiting for another
            # replica's upgrade too.
            await connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
            await connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
            await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})")
        return await connection.run_sync(_upgrade)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The ledger's revision; None for an empty database or a ledger made before migrations."""
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as connection:
        return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


async def require_head(engine: AsyncEngine) -> None:
    """Refuse to run on a schema that is not this code's newest revision (``upgrade_on_start = false``)."""
    current, head = await current_revision(engine), head_revision()
    if current != head:
        raise SchemaError(f"the ledger's schema is at revision {current or 'none'}, this imagegate needs {head}: "
                          "run `imagegate db upgrade` first")


def _upgrade(connection: Connection) -> UpgradeReport:
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    config = alembic_config()
    config.attributes["connection"] = connection
    before = MigrationContext.configure(connection).get_current_revision()
    if before is not None:
        try:
            ScriptDirectory.from_config(config).get_revision(before)
        except CommandError as exc:
            raise SchemaError(f"the ledger's schema is at revision {before}, which this imagegate does not know "
                              f"(its newest is {head_revision()}): it was written by a newer version") from exc
    adopted = before is None and set(inspect(connection).get_table_names()) >= BASELINE_TABLES
    if adopted:
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")
    after = MigrationContext.configure(connection).get_current_revision()
    assert after is not None
    return UpgradeReport(before, after, adopted)


@asynccontextmanager
async def _upgrade_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """Processes sharing a SQLite file upgrade one at a time (PostgreSQL locks inside the transaction)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(f"{database}.upgrade-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def new_revision(message: str) -> str:
    """Write ``versions/<next number>_<message>.py``: the difference between the schema the existing
    revisions build (on a scratch SQLite database) and ``imagegate.ledger.metadata``, as Alembic
    autogenerates it. Returns its path. Review it before committing (see README.md here)."""
    import tempfile

    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine

    with tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{scratch}/head.sqlite3")
        try:
            with engine.begin() as connection:
                config = alembic_config()
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                script = ScriptDirectory.from_config(config)
                numbers = [int(r.revision) for r in script.walk_revisions() if r.revision.isdigit()]
                written = command.revision(config, message=message, autogenerate=True,
                                           rev_id=f"{max(numbers, default=0) + 1:04d}")
        finally:
            engine.dispose()
    scripts = written if isinstance(written, list) else [written]
    return ", ".join(s.path for s in scripts if s is not None)

"""Ledger migrations, on SQLite and on a real PostgreSQL: what they build is exactly ``ledger.metadata``,
an existing pre-migrations ledger is adopted and upgraded in place, and replicas that start together
upgrade once."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text

from imagegate import migrations
from imagegate.config import LedgerSettings
from imagegate.ledger import GenerationStatus, PaymentStatus, SqlLedger
from imagegate.migrations import schema
from tests.support.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]

# The schema ledgers got from ``metadata.create_all`` before migrations existed (main at d2d9c86), as
# those servers created it; {timestamp} is DATETIME on SQLite, TIMESTAMP WITH TIME ZONE on PostgreSQL.
PRE_MIGRATIONS_DDL = [
    """CREATE TABLE generations (
        id VARCHAR(36) NOT NULL, created_at {timestamp} NOT NULL, updated_at {timestamp} NOT NULL,
        model VARCHAR(200) NOT NULL, status VARCHAR(32) NOT NULL, request TEXT NOT NULL,
        price_amount BIGINT NOT NULL, charged_amount BIGINT NOT NULL, provider_cost_micros BIGINT,
        payment_key VARCHAR(200), images TEXT, receipt TEXT, error TEXT, PRIMARY KEY (id))""",
    "CREATE INDEX ix_generations_payment_key ON generations (payment_key)",
    "CREATE INDEX ix_generations_model ON generations (model)",
    """CREATE TABLE payments (
        "key" VARCHAR(200) NOT NULL, created_at {timestamp} NOT NULL, updated_at {timestamp} NOT NULL,
        status VARCHAR(32) NOT NULL, network VARCHAR(64) NOT NULL, payer VARCHAR(64) NOT NULL,
        nonce VARCHAR(80) NOT NULL, pay_to VARCHAR(64) NOT NULL, asset VARCHAR(64) NOT NULL,
        amount BIGINT NOT NULL, valid_before BIGINT NOT NULL, generation_id VARCHAR(36),
        "transaction" VARCHAR(80), payload TEXT NOT NULL, error TEXT, PRIMARY KEY ("key"))""",
    "CREATE INDEX ix_payments_payer ON payments (payer)",
    """INSERT INTO generations VALUES ('g-old', '2026-01-02 03:04:05', '2026-01-02 03:04:06', 'imagegate-tiny',
        'completed', '{{"prompt":"an old one"}}', 1739, 1739, NULL, 'k-old', '[]', NULL, NULL)""",
    """INSERT INTO payments VALUES ('k-old', '2026-01-02 03:04:05', '2026-01-02 03:04:06', 'settled', 'eip155:84532',
        '0xpayer', '0x01', '0xpayto', '0xasset', 1739, 99999999999, 'g-old', '0xabc', '{{"v":1}}', NULL)""",
]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database("migrations")


@pytest.fixture
async def bare(database_url: str) -> AsyncIterator[SqlLedger]:
    """A ledger object on the database, not started (nothing created yet)."""
    ledger = SqlLedger(database_url)
    yield ledger
    await ledger.aclose()


def _schema_differences(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), schema()))


async def test_migrations_build_exactly_the_metadata(bare: SqlLedger) -> None:
    """A table or column added to ``ledger.metadata`` without a migration fails here."""
    report = await migrations.upgrade(bare.engine)
    assert (report.before, report.after, report.adopted) == (None, migrations.head_revision(), False)
    assert await migrations.is_current(bare.engine)
    async with bare.engine.connect() as connection:
        assert await connection.run_sync(_schema_differences) == []
    assert await migrations.current_revision(bare.engine) == migrations.head_revision()


def test_the_newest_revision_file_is_alembics_only_head() -> None:
    """Startup checks the revision without Alembic, from the file names: they must agree."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(migrations.alembic_config()).get_heads()
    assert heads == [migrations.newest_revision()] == [migrations.head_revision()]


async def test_a_ledger_made_before_migrations_is_adopted_in_place(bare: SqlLedger) -> None:
    timestamp = "TIMESTAMP WITH TIME ZONE" if bare.url.startswith("postgresql") else "DATETIME"
    async with bare.engine.begin() as connection:
        for statement in PRE_MIGRATIONS_DDL:
            await connection.exec_driver_sql(statement.format(timestamp=timestamp))
    assert await migrations.current_revision(bare.engine) is None

    await bare.start()  # what `imagegate serve` does on such a ledger

    assert await migrations.current_revision(bare.engine) == migrations.head_revision()
    async with bare.engine.connect() as connection:
        assert await connection.run_sync(_schema_differences) == []
    generation = await bare.generation("g-old")
    assert generation is not None and generation.status is GenerationStatus.COMPLETED
    assert generation.request == {"prompt": "an old one"} and generation.charged_amount == 1739
    payment = await bare.payment("k-old")
    assert payment is not None and payment.status is PaymentStatus.SETTLED and payment.generation_id == "g-old"
    [revenue] = await bare.revenue_by_model()
    assert (revenue.model, revenue.revenue_micros, revenue.uncosted_generations) == ("imagegate-tiny", 1739, 1)
    again = await migrations.upgrade(bare.engine)
    assert not again.changed


async def test_a_schema_from_a_newer_version_is_refused(bare: SqlLedger) -> None:
    await migrations.upgrade(bare.engine)
    async with bare.engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(migrations.SchemaError, match=r"9999.*newer version"):
        await bare.start()


async def test_without_upgrade_on_start_an_old_schema_is_refused(database_url: str) -> None:
    ledger = SqlLedger(database_url, LedgerSettings(url=database_url, upgrade_on_start=False))
    try:
        with pytest.raises(migrations.SchemaError, match="imagegate db upgrade"):
            await ledger.start()
        await migrations.upgrade(ledger.engine)
        await ledger.start()
    finally:
        await ledger.aclose()


async def _imagegate(*args: str, url: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagegate", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "IMAGEGATE_LEDGER__URL": url, "COLUMNS": "300"})
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_concurrent_upgrades_upgrade_once(database_url: str) -> None:
    """Three `imagegate db upgrade` at once (replicas starting together): one upgrades, two wait and
    find nothing to do; none fails."""
    results = await asyncio.gather(*(_imagegate("db", "upgrade", url=database_url) for _ in range(3)))
    assert all(code == 0 for code, _ in results), results
    outputs = [output for _, output in results]
    assert sum("from nothing to" in output for output in outputs) == 1, outputs
    assert sum("already at" in output for output in outputs) == 2, outputs
    code, output = await _imagegate("db", "current", url=database_url)
    assert code == 0 and f"revision {migrations.head_revision()} (newest)" in output


async def test_replicas_starting_together_upgrade_once(database_url: str) -> None:
    ledgers = [SqlLedger(database_url) for _ in range(4)]
    try:
        # A TaskGroup: one start failing cancels the others instead of leaving them running into later tests.
        async with asyncio.timeout(120), asyncio.TaskGroup() as starting:
            for ledger in ledgers:
                starting.create_task(ledger.start())
        assert await migrations.current_revision(ledgers[0].engine) == migrations.head_revision()
        async with ledgers[0].engine.connect() as connection:
            assert (await connection.execute(text("SELECT count(*) FROM alembic_version"))).scalar() == 1
    finally:
        await asyncio.gather(*(ledger.aclose() for ledger in ledgers))

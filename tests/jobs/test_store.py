"""The job store's statements on SQLite and on a real PostgreSQL (``postgres_url``): claims are exclusive,
leases fence, event ids increase per stream, webhook deliveries are claimed once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from imagegate.jobs.store import DeliveryStatus, JobStatus, JobStore, NewEvent, now_utc
from imagegate.ledger import SqlLedger


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
        engine = create_async_engine(url)
        async with engine.begin() as connection:  # a clean schema per test
            await connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            await connection.exec_driver_sql("CREATE SCHEMA public")
        await engine.dispose()
    ledger = SqlLedger(url)
    await ledger.start()
    job_store = JobStore(ledger)

    yield job_store
    await ledger.aclose()


async def new_job(store: JobStore, job_id: str, *, owner: str | None, lease_s: float = 30) -> None:
    await store.create(job_id=job_id, model="m", request={"prompt": "p"}, base_url="http://x",
                       deadline_at=now_utc() + timedelta(minutes=5), payment_context=None, payment_key=None,
                       payer=None, generation_id=f"gen-{job_id}", cancel_token_hash=None, webhook=None,
                       owner=owner, lease_s=lease_s)


async def test_a_lapsed_job_is_claimed_by_exactly_one_process(store: JobStore) -> None:
    await new_job(store, "job_a", owner="dead", lease_s=-1)  # its owner's lease already lapsed
    assert [job.id for job in await store.claimable("alive-1")] == ["job_a"]
    claims = await asyncio.gather(*(store.claim("job_a", f"alive-{n}", 30) for n in range(6)))
    assert sum(claims) == 1
    winner = f"alive-{claims.index(True)}"
    assert (await store.get("job_a")).owner == winner  # type: ignore[union-attr]
    assert await store.claimable("someone") == []
    # The dead owner, back, no longer holds it: its changes are refused.
    assert not await store.update("job_a", "dead", status=JobStatus.RUNNING)
    assert [job.id for job in await store.renew("dead", 30)] == []
    assert [job.id for job in await store.renew(winner, 30)] == ["job_a"]
    assert await store.renew_one("job_a", winner, 30) and not await store.renew_one("job_a", "dead", 30)


async def test_finishing_is_the_owners_and_writes_the_last_event(store: JobStore) -> None:
    await new_job(store, "job_b", owner="me")
    assert await store.finish("job_b", "other", JobStatus.SUCCEEDED, NewEvent("succeeded", {})) is None
    event = await store.finish("job_b", "me", JobStatus.SUCCEEDED, NewEvent("succeeded", {"status": "succeeded"}),
                               result={"images": []})
    assert event is not None and event.stream == "job:job_b"
    job = await store.get("job_b")
    assert job is not None and job.status is JobStatus.SUCCEEDED and job.result == {"images": []}
    assert job.owner is None and job.finished_at is not None
    assert not await store.claim("job_b", "me", 30)  # finished jobs are nobody's to claim


async def test_event_ids_increase_and_old_step_events_are_pruned(store: JobStore) -> None:
    stored = []
    for step in range(1, 6):
        stored += await store.append("job:j", [NewEvent("progress", {"step": step})])
    stored += await store.append("request:r" * 3, [NewEvent("progress", {"step": 1})])
    stored += await store.append("job:j", [NewEvent("succeeded", {"status": "succeeded"})])
    ids = [event.id for event in stored]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e.data.get("step") for e in await store.events_after("job:j", stored[1].id)] == [3, 4, 5, None]
    latest = await store.latest_event("job:j", ["progress"])
    assert latest is not None and latest.data == {"step": 5}
    assert await store.prune_events(now_utc() + timedelta(seconds=1), step_types=["progress"]) == 6
    assert [e.type for e in await store.events_after("job:j", 0)] == ["succeeded"]


async def test_webhook_deliveries_are_claimed_once_and_410_ends_a_url(store: JobStore) -> None:
    def plan(events: list[object]) -> list[dict[str, object]]:
        return [{"id": f"msg_{e.id}", "job_id": "job_w", "event_type": e.type,  # type: ignore[attr-defined]
                 "url": "https://r/x", "secret": None, "payload": "{}"} for e in events]

    stored = await store.append("job:job_w", [NewEvent("running", {}), NewEvent("succeeded", {})], deliveries=plan)
    due = await store.due_deliveries(10)
    assert [d.id for d in due] == [f"msg_{e.id}" for e in stored]
    claims = await asyncio.gather(*(store.claim_delivery(due[0].id, 30) for _ in range(4)))
    assert sum(claims) == 1
    assert [d.id for d in await store.due_deliveries(10)] == [due[1].id]  # the claimed one is leased
    await store.record_attempt(due[0].id, status=DeliveryStatus.GONE, attempts=1, next_attempt_at=None,
                               last_status=410, last_error="410 Gone")
    assert await store.url_gone("job_w", "https://r/x") and not await store.url_gone("job_w", "https://r/y")
    await store.give_up_url("job_w", "https://r/x")
    assert await store.due_deliveries(10) == []
    assert [(d["status"], d["lastStatus"]) for d in await store.deliveries_of("job_w")] == [
        ("gone", 410), ("gone", None)]

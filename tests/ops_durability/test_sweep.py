"""What dead requests leave behind, finished by reconciliation: generations left running or settling
are failed or completed by their payment's fate, and staged images nobody will finish are published
(their generation completed: a publish cut short) or discarded, never left behind.

Real ledger (SQLite), real image store (files), the real x402 gate's reconciliation; the crashes are
reproduced by writing what a killed request leaves on disk.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from imagegate import devchain
from imagegate.catalog import build_catalog
from imagegate.config import load_settings
from imagegate.ledger import GenerationStatus, PaymentRecord, PaymentStatus, SqlLedger
from imagegate.payments.facilitators import BuiltinFacilitator
from imagegate.payments.x402 import PaymentOption, X402Gate
from imagegate.service import ImageService
from imagegate.storage import LocalImageStore, StagedImage
from imagegate.types import OutputFormat, PaymentTerms
from imagegate.workers import build_engine
from tests.support.server import free_port

HOUR = 3600
STALE_S = 30.0
NETWORK = devchain.NETWORK_V2


@dataclass
class World:
    service: ImageService
    ledger: SqlLedger
    store: LocalImageStore
    root: Path

    async def stage(self, generation_id: str, *, age_s: float = HOUR) -> StagedImage:
        """An image staged by ``generation_id``'s request, ``age_s`` ago."""
        staged = await self.store.stage(Image.new("RGB", (8, 8)), OutputFormat.PNG, {"generationId": generation_id},
                                        seed=1)
        for path in self.staging.glob(f"{staged.uuid}.*"):
            os.utime(path, (time.time() - age_s, time.time() - age_s))
        return staged

    async def generation(self, generation_id: str, status: GenerationStatus, images: list[StagedImage],
                         payment_key: str | None = None) -> None:
        await self.ledger.start_generation(generation_id, "bench-simulated", {"prompt": "x"}, 16, payment_key)
        records = [{"uuid": i.uuid, "format": "png", "seed": 1, "width": 8, "height": 8, "bytes": i.size_bytes}
                   for i in images]
        await self.ledger.update_generation(generation_id, status, images=records or None)
        self.age("generations", generation_id)

    async def payment(self, status: PaymentStatus, generation_id: str, *, fresh: bool = False) -> str:
        """A payment bound to ``generation_id``; untouched for an hour unless ``fresh`` (kept alive)."""
        nonce = "0x" + uuid.uuid4().hex * 2
        key = f"{NETWORK}:0xpayer:{nonce}"
        record = PaymentRecord(key=key, status=PaymentStatus.RESERVED, network=NETWORK, payer="0xpayer",
                               nonce=nonce, pay_to=devchain.PAY_TO_ACCOUNT.address, asset=devchain.USDC_ADDRESS,
                               amount=16, valid_before=int(time.time()) + HOUR, generation_id=None,
                               transaction=None, payload={"version": 2}, error=None)
        assert await self.ledger.reserve_payment(record) is None
        await self.ledger.update_payment(key, status, generation_id=generation_id,
                                         transaction="0x" + "ab" * 32 if status is PaymentStatus.SETTLED else None)
        if not fresh:
            self.age("payments", key)
        return key

    def age(self, table: str, key: str) -> None:
        """Makes a row look untouched for an hour (its request died an hour ago)."""
        column = "key" if table == "payments" else "id"
        with contextlib.closing(sqlite3.connect(self.root / "ledger.sqlite3")) as connection, connection:
            connection.execute(f"UPDATE {table} SET updated_at = ? WHERE {column} = ?",
                               (datetime.now(UTC) - timedelta(hours=1), key))

    @property
    def staging(self) -> Path:
        return self.root / "images" / "staging"

    def staged_files(self) -> set[str]:
        return {path.name for path in self.staging.iterdir()} if self.staging.exists() else set()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    settings = load_settings(data_dir=tmp_path, models={"bench-simulated": {"enabled": True}})
    ledger = SqlLedger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}")
    await ledger.start()
    store = LocalImageStore(tmp_path / "images")
    option = PaymentOption(devchain.NETWORK_V1, NETWORK, devchain.USDC_ADDRESS, "USDC", "2",
                           devchain.PAY_TO_ACCOUNT.address)
    # The facilitator is never asked here (nothing is settling); its RPC is a closed loopback port.
    facilitator = BuiltinFacilitator(devchain.FACILITATOR_ACCOUNT.private_key, f"http://127.0.0.1:{free_port()}",
                                     [NETWORK], confirmation_timeout_s=5)
    gate = X402Gate([option], facilitator, ledger, max_timeout_seconds=300, chain=None, in_flight_wait_s=1,
                    facts={})
    service = ImageService(build_catalog(settings), build_engine(settings), store, ledger, gate, OutputFormat.PNG,
                           PaymentTerms(asset=option.asset, network=option.network_v1))
    yield World(service, ledger, store, tmp_path)
    await service.aclose()


async def status_of(world: World, generation_id: str) -> GenerationStatus:
    record = await world.ledger.generation(generation_id)
    assert record is not None
    return record.status


async def test_abandoned_generations_follow_their_payment(world: World) -> None:
    released, superseded, other, settled, alive = (str(uuid.uuid4()) for _ in range(5))
    # Died rendering; the payment was released since (the client may use it again).
    await world.generation(released, GenerationStatus.RUNNING, [],
                           await world.payment(PaymentStatus.RELEASED, released))
    # Died rendering; the client's resend already bought another generation with the same payment.
    key = await world.payment(PaymentStatus.RESERVED, other, fresh=True)
    await world.generation(superseded, GenerationStatus.RUNNING, [], key)
    await world.generation(other, GenerationStatus.RUNNING, [], key)
    # Died between settlement and publishing: the money moved, so the images are delivered.
    image = await world.stage(settled)
    await world.generation(settled, GenerationStatus.SETTLING, [image],
                           await world.payment(PaymentStatus.SETTLED, settled))
    # Alive elsewhere: its payment is kept alive (fresh), so it is left alone however old it looks.
    await world.generation(alive, GenerationStatus.RUNNING, [],
                           await world.payment(PaymentStatus.RESERVED, alive, fresh=True))

    await world.service.reconcile_pending(STALE_S)

    assert await status_of(world, released) is GenerationStatus.FAILED
    assert await status_of(world, superseded) is GenerationStatus.FAILED
    assert await status_of(world, other) is GenerationStatus.RUNNING
    assert await status_of(world, alive) is GenerationStatus.RUNNING
    record = await world.ledger.generation(settled)
    assert record is not None and record.status is GenerationStatus.COMPLETED
    assert record.receipt is not None and record.charged_amount == 16
    assert await world.store.open(image.uuid) is not None
    assert world.staged_files() == set()


async def test_staged_images_are_published_or_discarded_never_left_behind(world: World) -> None:
    completed, half, failed, settling = (str(uuid.uuid4()) for _ in range(4))
    # Its generation completed, but the publish was cut short: published now.
    completed_image = await world.stage(completed)
    await world.generation(completed, GenerationStatus.COMPLETED, [completed_image])
    # Cut short between the two moves of a publish: the record is published, the image is not.
    half_image = await world.stage(half)
    await world.generation(half, GenerationStatus.COMPLETED, [half_image])
    target = world.root / "images" / half_image.uuid[:2]
    target.mkdir(parents=True, exist_ok=True)
    os.replace(world.staging / f"{half_image.uuid}.json", target / f"{half_image.uuid}.json")
    # Its generation failed, or is unknown, or its record was never written: discarded.
    failed_image = await world.stage(failed)
    await world.generation(failed, GenerationStatus.FAILED, [failed_image])
    unknown_image = await world.stage(str(uuid.uuid4()))
    bare_image = await world.stage(str(uuid.uuid4()))
    (world.staging / f"{bare_image.uuid}.json").unlink()
    leftover = world.staging / f".{bare_image.uuid}.png.123.tmp"
    leftover.write_bytes(b"partial")
    os.utime(leftover, (time.time() - HOUR, time.time() - HOUR))
    # Still being finished (settling: its payment decides), or staged a moment ago: kept.
    settling_image = await world.stage(settling)
    await world.generation(settling, GenerationStatus.SETTLING, [settling_image],
                           await world.payment(PaymentStatus.SETTLING, settling, fresh=True))
    recent_image = await world.stage(str(uuid.uuid4()), age_s=0)

    await world.service.reconcile_pending(STALE_S)

    assert await world.store.open(completed_image.uuid) is not None
    assert await world.store.open(half_image.uuid) is not None
    for gone in (failed_image, unknown_image, bare_image):
        assert await world.store.open(gone.uuid) is None
    assert world.staged_files() == {f"{settling_image.uuid}.png", f"{settling_image.uuid}.json",
                                    f"{recent_image.uuid}.png", f"{recent_image.uuid}.json"}

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from imagegate.storage import ImageStore, LocalImageStore
from imagegate.types import OutputFormat
from tests.support.s3 import MotoS3Server, s3_store


def _image(colour: str = "red") -> Image.Image:
    return Image.new("RGB", (128, 64), colour)


async def test_staged_images_are_unreachable_until_published(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    staged = await store.stage(_image(), OutputFormat.PNG, {"prompt": "a red box", "model": "m"}, seed=7)
    assert await store.open(staged.uuid) is None
    await store.publish([staged])
    image_file = await store.open(staged.uuid)
    assert image_file is not None and image_file.media_type == "image/png" and image_file.path is not None
    decoded = Image.open(io.BytesIO(image_file.path.read_bytes()))
    assert decoded.size == (128, 64) and decoded.getpixel((0, 0)) == (255, 0, 0)
    record = await store.metadata(staged.uuid)
    assert record is not None
    assert record["prompt"] == "a red box" and record["seed"] == 7 and record["model"] == "m"
    assert image_file.etag == f'"{record["sha256"]}"'
    assert not list((tmp_path / "staging").iterdir())


async def test_discard_removes_everything(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    staged = await store.stage(_image(), OutputFormat.WEBP, {}, seed=None)
    await store.discard([staged])
    assert not list((tmp_path / "staging").iterdir())
    assert await store.open(staged.uuid) is None


async def test_formats(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path, quality=80)
    formats = ((OutputFormat.PNG, "PNG"), (OutputFormat.WEBP, "WEBP"), (OutputFormat.JPEG, "JPEG"))
    for output_format, pil_name in formats:
        staged = await store.stage(_image("blue"), output_format, {}, seed=1)
        await store.publish([staged])
        image_file = await store.open(staged.uuid)
        assert image_file is not None and image_file.path is not None
        assert image_file.path.suffix == f".{output_format.extension}"
        assert Image.open(image_file.path).format == pil_name
        assert json.loads(image_file.path.with_suffix(".json").read_text())["mediaType"] == output_format.media_type


async def test_names_that_are_not_uuids_never_touch_the_disk(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    for name in ("../../etc/passwd", "..", "", "abc", "00000000-0000-0000-0000-000000000000"):
        assert await store.open(name) is None


# --- behaviour every store shares (the embedded local one and S3 on moto's server) -----------------


@pytest.fixture(params=["local", "s3"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ImageStore]:
    if request.param == "local":
        yield LocalImageStore(tmp_path)
        return
    server: MotoS3Server = request.getfixturevalue("s3_server")
    async with s3_store(server, tmp_path) as store:
        yield store


async def _read_all(store: ImageStore, image_uuid: str, extension: str) -> bytes:
    return b"".join([chunk async for chunk in store.read(image_uuid, extension)])


async def test_publishing_again_or_at_once_leaves_one_image(any_store: ImageStore) -> None:
    staged = [await any_store.stage(_image(colour), OutputFormat.PNG, {"prompt": colour}, seed=i)
              for i, colour in enumerate(("red", "green"))]
    # Two publishers at once (a replay and a reconciler), then once more after "a crash".
    await asyncio.gather(any_store.publish(staged), any_store.publish(staged))
    await any_store.publish(staged)
    for image in staged:
        image_file = await any_store.open(image.uuid)
        assert image_file is not None and image_file.size_bytes == image.size_bytes
        data = await _read_all(any_store, image.uuid, "png")
        assert f'"{hashlib.sha256(data).hexdigest()}"' == image_file.etag
    assert await any_store.staged_before(datetime.now(UTC) + timedelta(hours=1)) == []


async def test_staged_before_lists_only_older_staged_images(any_store: ImageStore) -> None:
    old = await any_store.stage(_image(), OutputFormat.WEBP, {}, seed=3)
    published = await any_store.stage(_image(), OutputFormat.PNG, {}, seed=4)
    await any_store.publish([published])
    await asyncio.sleep(1.1)  # S3 timestamps have one-second resolution
    cutoff = datetime.now(UTC)
    await asyncio.sleep(1.1)
    await any_store.stage(_image(), OutputFormat.JPEG, {}, seed=5)
    assert [entry.image for entry in await any_store.staged_before(cutoff)] == [old]
    await any_store.discard([old])
    assert await any_store.staged_before(cutoff) == []

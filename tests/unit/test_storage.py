from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from imagegate.storage import LocalImageStore
from imagegate.types import OutputFormat


def _image(colour: str = "red") -> Image.Image:
    return Image.new("RGB", (128, 64), colour)


async def test_staged_images_are_unreachable_until_published(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    staged = await store.stage(_image(), OutputFormat.PNG, {"prompt": "a red box", "model": "m"}, seed=7)
    assert await store.open(staged.uuid) is None
    await store.publish([staged])
    image_file = await store.open(staged.uuid)
    assert image_file is not None and image_file.media_type == "image/png"
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
        assert image_file is not None
        assert image_file.path.suffix == f".{output_format.extension}"
        assert Image.open(image_file.path).format == pil_name
        assert json.loads(image_file.path.with_suffix(".json").read_text())["mediaType"] == output_format.media_type


async def test_names_that_are_not_uuids_never_touch_the_disk(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    for name in ("../../etc/passwd", "..", "", "abc", "00000000-0000-0000-0000-000000000000"):
        assert await store.open(name) is None

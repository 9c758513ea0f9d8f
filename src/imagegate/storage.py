"""Image storage: staged while a request is in flight, published only once it is paid for.

``ImageStore`` is the seam (an S3-compatible store plugs in here); ``LocalImageStore`` is the
embedded default: files under one directory, written atomically, with a JSON sidecar that
records the request's parameters, the seed and the model of each image.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import uuid as uuid_lib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL.Image import Image

from imagegate.types import OutputFormat

_UUID_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class StagedImage:
    uuid: str
    format: OutputFormat
    width: int
    height: int
    seed: int | None
    size_bytes: int


@dataclass(frozen=True)
class ImageFile:
    """A published image, ready to serve."""

    path: Path
    media_type: str
    etag: str
    size_bytes: int


def encode_image(image: Image, output_format: OutputFormat, quality: int) -> bytes:
    buffer = io.BytesIO()
    if output_format is OutputFormat.PNG:
        image.save(buffer, format="PNG")
    elif output_format is OutputFormat.WEBP:
        image.save(buffer, format="WEBP", quality=quality)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class ImageStore(ABC):
    @abstractmethod
    async def stage(
        self, image: Image, output_format: OutputFormat, metadata: dict[str, Any], seed: int | None
    ) -> StagedImage:
        """Store an image that is not yet reachable by URL."""

    @abstractmethod
    async def publish(self, images: list[StagedImage]) -> None:
        """Make staged images reachable (after payment settled)."""

    @abstractmethod
    async def discard(self, images: list[StagedImage]) -> None:
        """Delete staged images (generation or payment failed)."""

    @abstractmethod
    async def open(self, image_uuid: str) -> ImageFile | None:
        """A published image, or None."""

    @abstractmethod
    async def metadata(self, image_uuid: str) -> dict[str, Any] | None:
        """The record stored beside a published image, or None."""


class LocalImageStore(ImageStore):
    """``<root>/staging/<uuid>.<ext>`` until published, then ``<root>/<uu>/<uuid>.<ext>`` + ``.json``."""

    def __init__(self, root: Path, quality: int = 92):
        self.root = root
        self.quality = quality
        self._staging = root / "staging"

    def _published_dir(self, image_uuid: str) -> Path:
        # Two-character fan-out keeps directories small at millions of images.
        return self.root / image_uuid[:2]

    async def stage(
        self, image: Image, output_format: OutputFormat, metadata: dict[str, Any], seed: int | None
    ) -> StagedImage:
        image_uuid = str(uuid_lib.uuid4())
        data = await asyncio.to_thread(encode_image, image, output_format, self.quality)
        record = {
            **metadata,
            "uuid": image_uuid,
            "seed": seed,
            "width": image.width,
            "height": image.height,
            "format": output_format.value,
            "mediaType": output_format.media_type,
            "sha256": hashlib.sha256(data).hexdigest(),
            "createdAt": datetime.now(UTC).isoformat(),
        }
        name = f"{image_uuid}.{output_format.extension}"
        await asyncio.to_thread(self._write_staged, name, data, record)
        return StagedImage(image_uuid, output_format, image.width, image.height, seed, len(data))

    def _write_staged(self, name: str, data: bytes, record: dict[str, Any]) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)
        _atomic_write(self._staging / name, data)
        _atomic_write(self._staging / f"{Path(name).stem}.json", json.dumps(record, indent=1).encode())

    async def publish(self, images: list[StagedImage]) -> None:
        await asyncio.to_thread(self._publish, images)

    def _publish(self, images: list[StagedImage]) -> None:
        for image in images:
            target = self._published_dir(image.uuid)
            target.mkdir(parents=True, exist_ok=True)
            name = f"{image.uuid}.{image.format.extension}"
            # The sidecar first: an image file that exists always has its record. Each move happens at
            # most once, so publishing again after an interruption completes what is left.
            for file_name in (f"{image.uuid}.json", name):
                if (self._staging / file_name).exists() or not (target / file_name).exists():
                    os.replace(self._staging / file_name, target / file_name)

    async def discard(self, images: list[StagedImage]) -> None:
        await asyncio.to_thread(self._discard, images)

    def _discard(self, images: list[StagedImage]) -> None:
        for image in images:
            (self._staging / f"{image.uuid}.{image.format.extension}").unlink(missing_ok=True)
            (self._staging / f"{image.uuid}.json").unlink(missing_ok=True)

    async def open(self, image_uuid: str) -> ImageFile | None:
        record = await self.metadata(image_uuid)
        if record is None:
            return None
        output_format = OutputFormat(record["format"])
        path = self._published_dir(image_uuid) / f"{image_uuid}.{output_format.extension}"
        size = await asyncio.to_thread(lambda: path.stat().st_size if path.exists() else None)
        if size is None:
            return None
        return ImageFile(path, output_format.media_type, f'"{record["sha256"]}"', size)

    async def metadata(self, image_uuid: str) -> dict[str, Any] | None:
        if not _UUID_NAME.match(image_uuid):
            return None
        path = self._published_dir(image_uuid) / f"{image_uuid}.json"
        text = await asyncio.to_thread(lambda: path.read_text() if path.exists() else None)
        return None if text is None else dict(json.loads(text))


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)

"""Image storage: staged while a request is in flight, published only once it is paid for.

``ImageStore`` is the seam; ``LocalImageStore`` is the embedded default: files under one directory,
written atomically, with a JSON sidecar that records the request's parameters, the seed and the
model of each image. ``imagegate.storage_s3.S3ImageStore`` keeps the same layout in an
S3-compatible bucket (``[storage] kind = "s3"``), for several API processes and a CDN.

Publishing is idempotent in every store: publishing again after an interruption completes what is
left, and never leaves two copies of an image.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image as PILImage
from PIL.Image import Image

from imagegate.types import OutputFormat

if TYPE_CHECKING:
    from imagegate.config import StorageSettings

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
class StagedEntry:
    """An image found staged (for the orphan sweep): what it is, and which generation staged it."""

    image: StagedImage
    # None when its record is missing (a crash between writing the image and its record).
    generation_id: str | None
    staged_at: datetime


@dataclass(frozen=True)
class ImageFile:
    """A published image, ready to serve: from ``path`` when it is a local file, else streamed by
    ``ImageStore.read``; or fetched by clients from ``redirect_url`` (a CDN) when the store has one."""

    media_type: str
    etag: str
    size_bytes: int
    extension: str
    path: Path | None = None
    redirect_url: str | None = None


READ_CHUNK_BYTES = 256 * 1024
IMMUTABLE_CACHE_CONTROL = "public, max-age=31536000, immutable"


def format_of_extension(extension: str) -> OutputFormat | None:
    return next((f for f in OutputFormat if f.extension == extension), None)


def is_image_uuid(name: str) -> bool:
    return bool(_UUID_NAME.match(name))


def encode_image(image: Image, output_format: OutputFormat, quality: int) -> bytes:
    buffer = io.BytesIO()
    if output_format is OutputFormat.PNG:
        image.save(buffer, format="PNG")
    elif output_format is OutputFormat.WEBP:
        image.save(buffer, format="WEBP", quality=quality)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def image_record(image_uuid: str, image: Image, output_format: OutputFormat, metadata: dict[str, Any],
                 seed: int | None, data: bytes) -> dict[str, Any]:
    """The sidecar stored beside an image: the request's parameters, the seed, and the file's facts."""
    return {
        **metadata,
        "uuid": image_uuid,
        "seed": seed,
        "width": image.width,
        "height": image.height,
        "format": output_format.value,
        "mediaType": output_format.media_type,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "createdAt": datetime.now(UTC).isoformat(),
    }


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
    async def staged_before(self, cutoff: datetime) -> list[StagedEntry]:
        """Images staged before ``cutoff`` and still staged (neither published nor discarded): the
        candidates of the orphan sweep, which publishes or discards each by its generation's fate."""

    @abstractmethod
    async def open(self, image_uuid: str) -> ImageFile | None:
        """A published image, or None."""

    @abstractmethod
    async def metadata(self, image_uuid: str) -> dict[str, Any] | None:
        """The record stored beside a published image, or None."""

    async def read(self, image_uuid: str, extension: str) -> AsyncIterator[bytes]:
        """The bytes of a published image, in chunks (for stores whose ``ImageFile`` has no local path)."""
        image_file = await self.open(image_uuid)
        if image_file is None or image_file.path is None:
            raise FileNotFoundError(image_uuid)
        handle = await asyncio.to_thread(open, image_file.path, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, READ_CHUNK_BYTES):
                yield chunk
        finally:
            handle.close()

    def public_url(self, image_uuid: str, output_format: OutputFormat) -> str | None:
        """Where clients fetch a published image directly (a CDN), or None: through the API's /images route."""
        return None

    async def start(self) -> None:
        """Connect and check that the store is usable (called once at startup)."""

    async def aclose(self) -> None:
        """Release connections."""


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
        # One worker-thread trip for the encoding and the writes (each trip is a scheduler wakeup).
        size = await asyncio.to_thread(self._encode_and_stage, image_uuid, image, output_format, metadata, seed)
        return StagedImage(image_uuid, output_format, image.width, image.height, seed, size)

    def _encode_and_stage(self, image_uuid: str, image: Image, output_format: OutputFormat,
                          metadata: dict[str, Any], seed: int | None) -> int:
        data = encode_image(image, output_format, self.quality)
        record = image_record(image_uuid, image, output_format, metadata, seed, data)
        self._staging.mkdir(parents=True, exist_ok=True)
        _atomic_write(self._staging / f"{image_uuid}.{output_format.extension}", data)
        _atomic_write(self._staging / f"{image_uuid}.json", json.dumps(record, indent=1).encode())
        return len(data)

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
                    try:
                        os.replace(self._staging / file_name, target / file_name)
                    except FileNotFoundError:
                        # Published meanwhile by another publisher of the same images (a replay, the
                        # orphan sweep): done, as long as it is there now.
                        if not (target / file_name).exists():
                            raise

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
        return ImageFile(output_format.media_type, f'"{record["sha256"]}"', size, output_format.extension, path=path)

    async def metadata(self, image_uuid: str) -> dict[str, Any] | None:
        if not _UUID_NAME.match(image_uuid):
            return None
        path = self._published_dir(image_uuid) / f"{image_uuid}.json"
        text = await asyncio.to_thread(lambda: path.read_text() if path.exists() else None)
        return None if text is None else dict(json.loads(text))

    async def staged_before(self, cutoff: datetime) -> list[StagedEntry]:
        return await asyncio.to_thread(self._staged_before, cutoff.timestamp())

    def _staged_before(self, cutoff: float) -> list[StagedEntry]:
        if not self._staging.is_dir():
            return []
        found: dict[str, StagedEntry] = {}
        for path in self._staging.iterdir():
            try:
                modified = path.stat().st_mtime
            except FileNotFoundError:  # published or discarded meanwhile
                continue
            if modified >= cutoff:
                continue
            if path.name.startswith("."):
                # A write cut short by a crash (see _atomic_write): never part of any image.
                path.unlink(missing_ok=True)
                continue
            if not is_image_uuid(path.stem) or path.stem in found:
                continue
            staged = self._staged_image(path.stem)
            if staged is not None:
                found[path.stem] = StagedEntry(staged, self._generation_of(path.stem),
                                               datetime.fromtimestamp(modified, UTC))
        return list(found.values())

    def _generation_of(self, image_uuid: str) -> str | None:
        """The generation that staged an image: from its record, staged or (a publish cut short between
        the record and the image) already published."""
        for record_path in (self._staging / f"{image_uuid}.json",
                            self._published_dir(image_uuid) / f"{image_uuid}.json"):
            try:
                generation_id = json.loads(record_path.read_text()).get("generationId")
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            return generation_id if isinstance(generation_id, str) else None
        return None

    def _staged_image(self, image_uuid: str) -> StagedImage | None:
        """What is left of a staged image: its sidecar's facts, else the image file's own header."""
        try:
            record = json.loads((self._staging / f"{image_uuid}.json").read_text())
        except FileNotFoundError:
            record = None
        if record is not None:
            output_format = OutputFormat(record["format"])
            image_path = self._staging / f"{image_uuid}.{output_format.extension}"
            size = image_path.stat().st_size if image_path.exists() else 0
            return StagedImage(image_uuid, output_format, record["width"], record["height"], record["seed"], size)
        for output_format in OutputFormat:  # the image was written, its sidecar not (a crash in between)
            image_path = self._staging / f"{image_uuid}.{output_format.extension}"
            try:
                with PILImage.open(image_path) as image:
                    width, height = image.size
                return StagedImage(image_uuid, output_format, width, height, None, image_path.stat().st_size)
            except FileNotFoundError:
                continue
        return None


def build_store(settings: StorageSettings) -> ImageStore:
    """The store ``[storage]`` names (the S3 one needs the ``imagegate[s3]`` extra)."""
    if settings.kind == "s3":
        try:
            from imagegate.storage_s3 import S3ImageStore
        except ModuleNotFoundError as exc:
            raise RuntimeError(f'[storage] kind = "s3" needs the S3 client: pip install "imagegate[s3]" '
                               f"({exc})") from exc
        return S3ImageStore(settings.s3, quality=settings.quality)
    return LocalImageStore(settings.directory, quality=settings.quality)


def _atomic_write(path: Path, data: bytes) -> None:
    """Written whole or not at all (a temporary file renamed into place).

    Not fsynced: like the SQLite ledger's commits (WAL, synchronous=NORMAL), a write survives a
    crash of this process but not necessarily of the machine's OS. An fsync per file costs several
    milliseconds on a virtual disk (two per image), a large part of a paid request's latency, and
    would not help on its own: a ledger commit lost to a power cut loses the record of the image.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)

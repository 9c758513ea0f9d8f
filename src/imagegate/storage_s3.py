"""Images in an S3-compatible bucket, through aiobotocore (the ``imagegate[s3]`` extra).

Layout under ``[storage.s3] prefix``:

- ``staging/<uuid>.<ext>`` + ``staging/<uuid>.json``: staged while the request is in flight. Keep
  this prefix private (no public-read policy, no CDN route): nothing there has been paid for.
- ``images/<uuid>.<ext>`` + ``images/<uuid>.json``: published after settlement, with the image's
  Content-Type and ``Cache-Control: public, max-age=31536000, immutable`` (the CDN's origin).

Publishing copies staged → published with a conditional write (``If-None-Match: *``): a repeated or
raced publish finds the object there and leaves the one copy, on versioned buckets too. The ledger's
claim already makes one process publish a generation at a time; the condition keeps a store that is
shared by several deployments honest as well. (Stores that ignore the condition still get a HEAD
check first.) The sidecar is published after its image and marks it complete: the API finds an image
by its sidecar alone (one request), which then always has its image.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import ClientError
from PIL.Image import Image

from imagegate.config import S3StorageSettings
from imagegate.storage import (
    IMMUTABLE_CACHE_CONTROL,
    READ_CHUNK_BYTES,
    ImageFile,
    ImageStore,
    StagedEntry,
    StagedImage,
    encode_image,
    format_of_extension,
    image_record,
    is_image_uuid,
)
from imagegate.types import OutputFormat

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
# S3 answers 409 when another conditional write to the same key is in progress: ask again.
CONFLICT_RETRIES = 5
JSON_TYPE = "application/json"
# Per-object user metadata written at staging, so listing orphans needs no sidecar reads.
META_KEYS = ("width", "height", "seed", "format", "sha256")


class S3StorageError(RuntimeError):
    """The bucket cannot be used as configured (raised at startup with what to fix)."""


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class S3ImageStore(ImageStore):
    def __init__(self, settings: S3StorageSettings, quality: int = 92):
        if not settings.bucket:
            raise S3StorageError('[storage] kind = "s3" needs [storage.s3] bucket')
        self.settings = settings
        self.quality = quality
        self.bucket = settings.bucket
        prefix = settings.prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()

    # keys

    def staged_key(self, image_uuid: str, extension: str) -> str:
        return f"{self.prefix}staging/{image_uuid}.{extension}"

    def published_key(self, image_uuid: str, extension: str) -> str:
        return f"{self.prefix}images/{image_uuid}.{extension}"

    # lifecycle

    async def start(self) -> None:
        client = await self._connect()
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            raise S3StorageError(f"bucket {self.bucket!r} is not usable ({_code(exc) or exc}): check [storage.s3] "
                                 "bucket, endpoint_url, region and the credentials") from exc

    async def _connect(self) -> S3Client:
        async with self._lock:
            if self._client is not None:
                return self._client
            settings = self.settings
            session = AioSession(profile=settings.profile)
            if settings.credentials_file is not None:
                session.set_config_variable("credentials_file", str(settings.credentials_file))
            if await session.get_credentials() is None:
                raise S3StorageError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                                     "[storage.s3] credentials_file / profile (or run with an instance role)")
            s3_options: dict[str, Any] = {}
            if settings.addressing_style is not None:
                s3_options["addressing_style"] = settings.addressing_style
            config = AioConfig(s3=s3_options, max_pool_connections=settings.max_pool_connections,
                               retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=60)
            client: S3Client = await self._stack.enter_async_context(
                session.create_client("s3", region_name=settings.region, endpoint_url=settings.endpoint_url,
                                      config=config))
            self._client = client
            return client

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()

    # staging

    async def stage(
        self, image: Image, output_format: OutputFormat, metadata: dict[str, Any], seed: int | None
    ) -> StagedImage:
        import uuid

        client = await self._connect()
        image_uuid = str(uuid.uuid4())
        data = await asyncio.to_thread(encode_image, image, output_format, self.quality)
        record = image_record(image_uuid, image, output_format, metadata, seed, data)
        user_metadata = {key: str(record[key]) for key in META_KEYS if record[key] is not None}
        await asyncio.gather(
            client.put_object(Bucket=self.bucket, Key=self.staged_key(image_uuid, output_format.extension), Body=data,
                              ContentType=output_format.media_type, Metadata=user_metadata),
            client.put_object(Bucket=self.bucket, Key=self.staged_key(image_uuid, "json"),
                              Body=json.dumps(record, indent=1).encode(), ContentType=JSON_TYPE),
        )
        return StagedImage(image_uuid, output_format, image.width, image.height, seed, len(data))

    async def publish(self, images: list[StagedImage]) -> None:
        await asyncio.gather(*(self._publish_one(image) for image in images))

    async def _publish_one(self, image: StagedImage) -> None:
        extension = image.format.extension
        for part, content_type in ((extension, image.format.media_type), ("json", JSON_TYPE)):
            await self._copy_once(self.staged_key(image.uuid, part), self.published_key(image.uuid, part),
                                  content_type)
        await self._delete([self.staged_key(image.uuid, extension), self.staged_key(image.uuid, "json")])

    async def _copy_once(self, source: str, target: str, content_type: str) -> None:
        """``target`` := ``source``, unless ``target`` exists (then it already is: objects never change)."""
        client = await self._connect()
        for _ in range(CONFLICT_RETRIES):
            if await self._exists(target):
                return
            try:
                staged = await client.get_object(Bucket=self.bucket, Key=source)
            except ClientError as exc:
                if _code(exc) in NOT_FOUND and await self._exists(target):
                    return  # published and cleaned up by someone else meanwhile
                raise
            async with staged["Body"] as body:
                data = await body.read()
            try:
                # Written in full (not a server-side copy) because the destination condition is what
                # makes a raced publish leave one object, and S3-compatible servers honour it on PUT.
                await client.put_object(Bucket=self.bucket, Key=target, Body=data, ContentType=content_type,
                                        CacheControl=IMMUTABLE_CACHE_CONTROL, Metadata=staged.get("Metadata", {}),
                                        IfNoneMatch="*")
                return
            except ClientError as exc:
                if _code(exc) == "PreconditionFailed":
                    return  # another publisher wrote it first: the same bytes
                if _code(exc) != "ConditionalRequestConflict":
                    raise
        raise RuntimeError(f"could not publish {target}: conflicting writes kept going")

    async def _exists(self, key: str) -> bool:
        client = await self._connect()
        try:
            await client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                return False
            raise

    async def _delete(self, keys: list[str]) -> None:
        if keys:
            client = await self._connect()
            await client.delete_objects(Bucket=self.bucket,
                                        Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True})

    async def discard(self, images: list[StagedImage]) -> None:
        await self._delete([self.staged_key(image.uuid, part) for image in images
                            for part in (image.format.extension, "json")])

    # published images

    async def metadata(self, image_uuid: str) -> dict[str, Any] | None:
        if not is_image_uuid(image_uuid):
            return None
        client = await self._connect()
        try:
            response = await client.get_object(Bucket=self.bucket, Key=self.published_key(image_uuid, "json"))
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                return None
            raise
        async with response["Body"] as body:
            return dict(json.loads(await body.read()))

    async def open(self, image_uuid: str) -> ImageFile | None:
        record = await self.metadata(image_uuid)
        if record is None:
            return None
        output_format = OutputFormat(record["format"])
        # The sidecar is published last, so its image is there.
        return ImageFile(output_format.media_type, f'"{record["sha256"]}"', int(record["bytes"]),
                         output_format.extension, redirect_url=self.public_url(image_uuid, output_format))

    async def read(self, image_uuid: str, extension: str) -> AsyncIterator[bytes]:
        if not is_image_uuid(image_uuid) or format_of_extension(extension) is None:
            raise FileNotFoundError(image_uuid)
        client = await self._connect()
        response = await client.get_object(Bucket=self.bucket, Key=self.published_key(image_uuid, extension))
        async with response["Body"] as body:
            async for chunk in body.iter_chunks(READ_CHUNK_BYTES):
                yield chunk

    def public_url(self, image_uuid: str, output_format: OutputFormat) -> str | None:
        base = self.settings.public_base_url
        return None if base is None else f"{base.rstrip('/')}/{image_uuid}.{output_format.extension}"

    # the orphan sweep

    async def staged_before(self, cutoff: datetime) -> list[StagedEntry]:
        client = await self._connect()
        # uuid -> {extension: listing entry}; staging holds only what is in flight, so it stays small.
        parts: dict[str, dict[str, Any]] = {}
        async for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                            Prefix=f"{self.prefix}staging/"):
            for entry in page.get("Contents", []):
                image_uuid, _, extension = entry["Key"].rsplit("/", 1)[-1].partition(".")
                if is_image_uuid(image_uuid) and (extension == "json" or format_of_extension(extension)):
                    parts.setdefault(image_uuid, {})[extension] = entry
        found = []
        for image_uuid, entries in parts.items():
            staged_at = max(entry["LastModified"] for entry in entries.values())
            if staged_at >= cutoff:
                continue
            staged = await self._staged_entry(image_uuid, entries, staged_at)
            if staged is not None:
                found.append(staged)
        return found

    async def _staged_entry(self, image_uuid: str, entries: dict[str, Any],
                            staged_at: datetime) -> StagedEntry | None:
        """A staged image's facts from its object's metadata, and its generation from its record (the
        facts from the record alone when the image is already gone)."""
        client = await self._connect()
        image_extension = next((extension for extension in entries if extension != "json"), None)
        try:
            record: dict[str, Any] | None = None
            if "json" in entries:
                response = await client.get_object(Bucket=self.bucket, Key=entries["json"]["Key"])
                async with response["Body"] as body:
                    record = json.loads(await body.read())
            generation_id = record.get("generationId") if record is not None else None
            if not isinstance(generation_id, str):
                generation_id = None
            if image_extension is not None:
                entry = entries[image_extension]
                head = await client.head_object(Bucket=self.bucket, Key=entry["Key"])
                metadata = head.get("Metadata", {})
                seed = metadata.get("seed")
                output_format = format_of_extension(image_extension)
                assert output_format is not None
                image = StagedImage(image_uuid, output_format, int(metadata.get("width", 0)),
                                    int(metadata.get("height", 0)), int(seed) if seed is not None else None,
                                    int(entry["Size"]))
            elif record is not None:
                image = StagedImage(image_uuid, OutputFormat(record["format"]), record["width"], record["height"],
                                    record["seed"], 0)
            else:
                return None
        except ClientError as exc:
            if _code(exc) in NOT_FOUND:
                return None  # published or discarded since the listing
            raise
        return StagedEntry(image, generation_id, staged_at)

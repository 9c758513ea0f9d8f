"""The S3 image store against moto's standalone S3 server on 127.0.0.1 (no real S3 is reachable here)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imagegate.config import S3StorageSettings
from imagegate.storage import IMMUTABLE_CACHE_CONTROL
from imagegate.storage_s3 import S3ImageStore, S3StorageError
from imagegate.types import OutputFormat
from tests.support.s3 import ACCESS_KEY_ID, SECRET_ACCESS_KEY, MotoS3Server, credentials_file, s3_store


@pytest.fixture(autouse=True)
def _no_credentials_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")


def _image(colour: str = "red") -> Image.Image:
    return Image.new("RGB", (96, 64), colour)


async def test_staged_images_are_private_until_published(s3_server: MotoS3Server, tmp_path: Path) -> None:
    async with s3_store(s3_server, tmp_path) as store:
        staged = await store.stage(_image(), OutputFormat.WEBP, {"prompt": "a red box", "model": "m"}, seed=7)
        client = s3_server.client()
        keys = {entry["Key"] for entry in client.list_objects_v2(Bucket=store.bucket)["Contents"]}
        assert keys == {f"tenant-a/staging/{staged.uuid}.webp", f"tenant-a/staging/{staged.uuid}.json"}
        # Nothing under the published prefix: neither the store nor a CDN in front of images/ finds it.
        assert await store.open(staged.uuid) is None and await store.metadata(staged.uuid) is None

        await store.publish([staged])

        keys = {entry["Key"] for entry in client.list_objects_v2(Bucket=store.bucket)["Contents"]}
        assert keys == {f"tenant-a/images/{staged.uuid}.webp", f"tenant-a/images/{staged.uuid}.json"}
        head = client.head_object(Bucket=store.bucket, Key=f"tenant-a/images/{staged.uuid}.webp")
        assert head["ContentType"] == "image/webp" and head["CacheControl"] == IMMUTABLE_CACHE_CONTROL
        sidecar = client.head_object(Bucket=store.bucket, Key=f"tenant-a/images/{staged.uuid}.json")
        assert sidecar["ContentType"] == "application/json"
        record = await store.metadata(staged.uuid)
        assert record is not None and (record["prompt"], record["seed"], record["model"]) == ("a red box", 7, "m")
        image_file = await store.open(staged.uuid)
        assert image_file is not None and image_file.media_type == "image/webp" and image_file.path is None
        assert image_file.etag == f'"{record["sha256"]}"' and image_file.redirect_url is None
        data = b"".join([chunk async for chunk in store.read(staged.uuid, "webp")])
        assert len(data) == image_file.size_bytes == staged.size_bytes
        assert Image.open(io.BytesIO(data)).size == (96, 64)


async def test_racing_publishers_in_two_processes_leave_one_version(s3_server: MotoS3Server, tmp_path: Path) -> None:
    """Two stores (two API processes) publish the same images at once, repeatedly: each published key
    has exactly one version in the versioned bucket, and staging is empty."""
    bucket = s3_server.create_bucket()
    async with s3_store(s3_server, tmp_path, bucket=bucket) as first, \
            s3_store(s3_server, tmp_path, bucket=bucket) as second:
        staged = [await first.stage(_image(colour), OutputFormat.PNG, {}, seed=i)
                  for i, colour in enumerate(("red", "green", "blue"))]
        for _ in range(3):
            await asyncio.gather(first.publish(staged), second.publish(staged), first.publish(staged))
        versions = s3_server.versions(bucket, "tenant-a/images/")
        assert len(versions) == 6 and set(versions.values()) == {1}, versions
        listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="tenant-a/staging/")
        assert listing.get("KeyCount", 0) == 0


async def test_a_publish_cut_short_is_completed(s3_server: MotoS3Server, tmp_path: Path) -> None:
    async with s3_store(s3_server, tmp_path) as store:
        staged = await store.stage(_image(), OutputFormat.PNG, {}, seed=1)
        client = s3_server.client()
        # The process died after publishing the image and before its sidecar, which marks it complete.
        staged_image = client.get_object(Bucket=store.bucket, Key=f"tenant-a/staging/{staged.uuid}.png")
        client.put_object(Bucket=store.bucket, Key=f"tenant-a/images/{staged.uuid}.png",
                          Body=staged_image["Body"].read(), ContentType="image/png")
        assert await store.open(staged.uuid) is None
        await store.publish([staged])
        assert await store.open(staged.uuid) is not None
        assert s3_server.versions(store.bucket, "tenant-a/images/") == {
            f"tenant-a/images/{staged.uuid}.json": 1, f"tenant-a/images/{staged.uuid}.png": 1}


async def test_discard_removes_staged_objects(s3_server: MotoS3Server, tmp_path: Path) -> None:
    async with s3_store(s3_server, tmp_path) as store:
        staged = await store.stage(_image(), OutputFormat.JPEG, {}, seed=None)
        await store.discard([staged])
        assert s3_server.client().list_objects_v2(Bucket=store.bucket).get("KeyCount", 0) == 0
        assert await store.open(staged.uuid) is None


async def test_public_base_url_points_clients_at_the_cdn(s3_server: MotoS3Server, tmp_path: Path) -> None:
    """The bucket as a CDN origin (public read on <prefix>images/ only; moto enforces the policy for
    anonymous requests, standing in for the CDN): image URLs are the public ones; a staged image is
    refused even to someone who knows its key, and served once published."""
    bucket = s3_server.create_bucket()
    s3_server.allow_public_reads(bucket, "tenant-a/")
    cdn = f"{s3_server.endpoint_url}/{bucket}/tenant-a/images"
    async with s3_store(s3_server, tmp_path, bucket=bucket, public_base_url=cdn + "/") as store:
        staged = await store.stage(_image(), OutputFormat.PNG, {}, seed=2)
        url = store.public_url(staged.uuid, OutputFormat.PNG)
        assert url == f"{cdn}/{staged.uuid}.png"
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(url)).status_code == 404  # not published: not there
            staged_url = f"{s3_server.endpoint_url}/{bucket}/tenant-a/staging/{staged.uuid}.png"
            assert (await http.get(staged_url)).status_code == 403  # there, but private
            await store.publish([staged])
            response = await http.get(url)
        assert response.status_code == 200 and response.headers["cache-control"] == IMMUTABLE_CACHE_CONTROL
        assert response.headers["content-type"] == "image/png" and len(response.content) == staged.size_bytes
        image_file = await store.open(staged.uuid)
        assert image_file is not None and image_file.redirect_url == url


async def test_credentials_come_from_a_file_profile_or_the_environment(
        s3_server: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    named = credentials_file(tmp_path, "imagegate")
    async with s3_store(s3_server, tmp_path, credentials_file=named, profile="imagegate") as store:
        assert (await store.stage(_image(), OutputFormat.PNG, {}, seed=1)).width == 96
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    async with s3_store(s3_server, tmp_path, credentials_file=None, profile=None) as store:
        assert (await store.stage(_image(), OutputFormat.PNG, {}, seed=1)).width == 96


async def test_unusable_configurations_are_refused_at_start(s3_server: MotoS3Server, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    with pytest.raises(S3StorageError, match="no S3 credentials"):
        async with s3_store(s3_server, tmp_path, credentials_file=None, profile=None):
            pass
    with pytest.raises(S3StorageError, match="bucket 'no-such-bucket' is not usable"):
        async with s3_store(s3_server, tmp_path, bucket="no-such-bucket"):
            pass
    with pytest.raises(S3StorageError, match="needs"):
        S3ImageStore(S3StorageSettings(bucket=""))


async def test_names_that_are_not_uuids_are_never_requested(s3_server: MotoS3Server, tmp_path: Path) -> None:
    async with s3_store(s3_server, tmp_path) as store:
        for name in ("../staging/x", "..", "", "abc", "00000000-0000-0000-0000-000000000000"):
            assert await store.open(name) is None
            assert await store.metadata(name) is None


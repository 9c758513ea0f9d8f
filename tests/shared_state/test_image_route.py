"""GET /images/{uuid}.{ext} on the S3 store, in process (payments off, the simulated GPU): streamed
from the bucket with ETag/304 when there is no CDN, redirected to the CDN when there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from imagegate.app import app_from_settings
from imagegate.config import load_settings
from tests.support.s3 import MotoS3Server
from tests.support.server import live_server

BODY = {"prompt": "a plain square", "model": "bench-simulated", "width": 128, "height": 128, "numberResults": 2,
        "seed": 3}


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch, s3_server: MotoS3Server) -> None:
    for name, value in s3_server.credentials_env().items():
        monkeypatch.setenv(name, value)


def _serve(root: Path, s3_server: MotoS3Server, bucket: str, **s3: Any) -> Any:
    settings = load_settings(
        data_dir=root, payments={"enabled": False},
        storage={"kind": "s3", "s3": {"bucket": bucket, "prefix": "p/", "endpoint_url": s3_server.endpoint_url, **s3}},
        models={"bench-simulated": {"enabled": True}})
    return live_server(app_from_settings(settings))


@pytest.fixture
def bucket(s3_server: MotoS3Server) -> str:
    name = s3_server.create_bucket()
    s3_server.allow_public_reads(name, "p/")
    return name


async def test_without_a_cdn_the_api_streams_images_from_the_bucket(
        tmp_path: Path, s3_server: MotoS3Server, bucket: str, credentials: None) -> None:
    with _serve(tmp_path, s3_server, bucket) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False) as http:
            generated = await http.post("/v1/images/generate", json=BODY)
            assert generated.status_code == 200, generated.text
            for image in generated.json()["images"]:
                assert image["url"] == f"{base_url}/images/{image['uuid']}.png"
                response = await http.get(image["url"])
                stored = s3_server.client().get_object(Bucket=bucket, Key=f"p/images/{image['uuid']}.png")
                assert response.status_code == 200 and response.content == stored["Body"].read()
                assert response.headers["content-type"] == "image/png"
                assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
                assert int(response.headers["content-length"]) == len(response.content)
                again = await http.get(image["url"], headers={"If-None-Match": response.headers["etag"]})
                assert again.status_code == 304 and again.content == b""
                assert (await http.get(f"/images/{image['uuid']}.webp")).status_code == 404
            missing = await http.get("/images/6f1c2a3e-0000-4000-8000-000000000000.png")
            assert missing.status_code == 404 and missing.json()["error"] == "NOT_FOUND"


async def test_with_a_cdn_image_urls_are_the_cdns_and_the_api_redirects_there(
        tmp_path: Path, s3_server: MotoS3Server, bucket: str, credentials: None) -> None:
    cdn = f"{s3_server.endpoint_url}/{bucket}/p/images"
    with _serve(tmp_path, s3_server, bucket, public_base_url=cdn) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False) as http:
            generated = await http.post("/v1/images/generate", json=BODY)
            assert generated.status_code == 200, generated.text
            for image in generated.json()["images"]:
                assert image["url"] == f"{cdn}/{image['uuid']}.png"
                from_cdn = await http.get(image["url"])
                assert from_cdn.status_code == 200 and from_cdn.headers["content-type"] == "image/png"
                via_api = await http.get(f"/images/{image['uuid']}.png")
                assert via_api.status_code == 301 and via_api.headers["location"] == image["url"]

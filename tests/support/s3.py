"""moto's standalone S3 server on 127.0.0.1 (a free port), in its own process: the S3-compatible
endpoint the S3 image store's tests and the shared-state cluster talk to. One per test session
(``s3_server``); tests make their own buckets.

Registered as a pytest plugin in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.server import free_port, wait_answering

if TYPE_CHECKING:
    from imagegate.storage_s3 import S3ImageStore

# With no credentials configured, botocore's credential chain would ask the cloud instance-metadata
# address; tests talk to loopback only.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

# moto checks no signature: any key pair works, but clients need one to sign with.
ACCESS_KEY_ID = "imagegate-test"
SECRET_ACCESS_KEY = "imagegate-test-secret"
REGION = "us-east-1"


class MotoS3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="imagegate-moto-", suffix=".log", delete=False)  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "1"},
        )
        wait_answering(f"{self.endpoint_url}/moto-api/data.json", self.process, timeout_s=timeout_s,
                       exited=self.log_tail)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def log_tail(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-2000:]

    def client(self) -> Any:
        """A plain (sync) boto3 client for test set-up and inspection."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)

    def create_bucket(self, prefix: str = "imagegate", *, versioning: bool = True) -> str:
        """A new bucket (versioned by default, so a second write of one key shows as a second version)."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        client = self.client()
        client.create_bucket(Bucket=name)
        if versioning:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def allow_public_reads(self, bucket: str, prefix: str) -> None:
        """The bucket policy the README recommends for a CDN origin: anyone may read published images
        (``<prefix>images/``), nothing else. moto enforces it for anonymous requests."""
        self.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{bucket}/{prefix}images/*"}]}))

    def versions(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """How many versions each key under ``prefix`` has (delete markers excluded)."""
        counts: dict[str, int] = {}
        paginator = self.client().get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for version in page.get("Versions", []):
                counts[version["Key"]] = counts.get(version["Key"], 0) + 1
        return counts

    def credentials_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
                "AWS_DEFAULT_REGION": REGION}


@asynccontextmanager
async def s3_store(server: MotoS3Server, scratch: Path, **settings: Any) -> AsyncIterator[S3ImageStore]:
    """A started store on a new versioned bucket (credentials from a credentials file written in ``scratch``)."""
    settings.setdefault("bucket", server.create_bucket())
    settings.setdefault("prefix", "tenant-a/")
    settings.setdefault("endpoint_url", server.endpoint_url)
    if "credentials_file" not in settings and "profile" not in settings:
        settings["credentials_file"] = credentials_file(scratch, "default")
    from imagegate.config import S3StorageSettings
    from imagegate.storage_s3 import S3ImageStore

    store = S3ImageStore(S3StorageSettings(**settings), quality=90)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


def credentials_file(folder: Path, profile: str) -> Path:
    path = folder / f"aws-credentials-{profile}"
    path.write_text(f"[{profile}]\naws_access_key_id = {ACCESS_KEY_ID}\naws_secret_access_key = {SECRET_ACCESS_KEY}\n")
    return path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server()
    try:
        server.start()
        yield server
    finally:
        server.stop()

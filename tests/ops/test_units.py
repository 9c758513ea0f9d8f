"""The pieces under the operations layers, without a server: token buckets, client keys, the log scrub."""

from __future__ import annotations

import base64
import json

from imagegate import logs, metrics
from imagegate.config import RateLimit
from imagegate.limits import ClientBuckets, ClientKeys, TokenBucket


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(RateLimit(rate=2, burst=3), now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == 0.5  # one token back in 1/rate seconds
    assert bucket.take(100.25) == 0.25
    assert bucket.take(100.5) == 0.0
    assert not bucket.full(101.0) and bucket.full(102.0)  # 3 tokens after 1.5 s at 2/s


def test_client_buckets_stay_bounded() -> None:
    buckets = ClientBuckets({"estimate": RateLimit(rate=1, burst=2)}, max_clients=100)
    for number in range(1000):
        buckets.bucket(f"10.0.{number // 256}.{number % 256}", "estimate", now=0.0).take(0.0)
    assert len(buckets.buckets) <= 100
    # Full (idle) buckets are forgotten first: a client that drained its bucket is remembered.
    drained = buckets.bucket("192.0.2.1", "estimate", now=1000.0)
    drained.take(1000.0)
    drained.take(1000.0)
    for number in range(200):
        buckets.bucket(f"198.51.100.{number}", "estimate", now=1000.0)  # full, so forgettable
    assert buckets.bucket("192.0.2.1", "estimate", now=1000.5).tokens < 1


def test_client_keys_group_ipv6_by_64_and_skip_exempt_clients() -> None:
    keys = ClientKeys(["127.0.0.0/8", "::1"])
    assert keys.key("127.0.0.1") is None and keys.key("::1") is None
    assert keys.key("203.0.113.9") == "203.0.113.9"
    assert keys.key("2001:db8:1:2:aaaa::1") == keys.key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::"
    assert keys.key("2001:db8:1:3::1") != keys.key("2001:db8:1:2::1")


def test_the_scrub_removes_secrets_and_keeps_hashes_and_addresses() -> None:
    signature = "0x" + "ab12" * 32 + "1c"
    header = base64.b64encode(json.dumps({"x402Version": 2, "payload": {"signature": signature}}).encode()).decode()
    transaction = "0x" + "9f" * 32
    address = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    logs.register_secret("0x" + "5e" * 32)
    line = (f"sig={signature} raw={signature[2:]} header={header} tx={transaction} payer={address} "
            f"key={'5e' * 32}")
    scrubbed = logs.redact(line)
    assert signature[2:] not in scrubbed and header not in scrubbed and "5e" * 32 not in scrubbed
    assert f"tx={transaction}" in scrubbed and f"payer={address}" in scrubbed
    assert scrubbed.count(logs.REDACTED) == 4


def test_size_buckets() -> None:
    assert [metrics.size_bucket(w, h) for w, h in ((128, 128), (512, 512), (512, 1024), (1024, 1024),
                                                   (2048, 2048))] == ["256", "512", "768", "1024", "2048"]

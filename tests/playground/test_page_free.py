"""How imagegate serves the playground (content negotiation, caching, CSP, a missing build), and the
page on a server whose operator switched payments off: free images, no wallet, progress while it
renders. One server (payments off) and one chromium for the module."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, expect

from imagegate import playground
from imagegate.app import app_from_settings, create_app
from tests.integration.conftest import tiny_settings
from tests.playground.support import open_playground, screenshot, serious_accessibility_violations
from tests.support.server import live_server

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
# The simulated GPU holds each render this long: long enough to watch the progress.
SIMULATED_RENDER_MS = 2500


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_paths: dict[str, Path]) -> Iterator[str]:
    root = tmp_path_factory.mktemp("playground-free")
    settings = tiny_settings(root, tiny_model_paths, payments={"enabled": False}, models={
        "bench-simulated": {"enabled": True, "options": {"batch_ms": SIMULATED_RENDER_MS}}})
    with live_server(app_from_settings(settings), startup_timeout=120) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30, trust_env=False) as client:
        yield client


@pytest.mark.parametrize(("accept", "html"), [
    (BROWSER_ACCEPT, True),
    ("text/html", True),
    ("text/html;q=0.9, application/json", False),
    ("application/json", False),
    ("*/*", False),
    ("application/json, text/html", False),
    ("text/*", True),
    ("text/html;q=0", False),
    ("", False),
    (None, False),
])
def test_a_browser_is_told_apart_from_a_json_client(accept: str | None, html: bool) -> None:
    assert playground.prefers_html(accept) is html


def test_get_root_answers_browsers_with_the_page_and_programs_with_the_manifest(http: httpx.Client) -> None:
    for headers in ({}, {"Accept": "application/json"}, {"Accept": "*/*"}):
        manifest = http.get("/", headers=headers)
        assert manifest.status_code == 200 and manifest.json()["name"] == "imagegate"
        assert "Accept" in manifest.headers["vary"]
    page = http.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>imagegate playground</title>" in page.text
    assert "Accept" in page.headers["vary"]
    assert page.headers["cache-control"] == "no-cache"
    assert page.headers["x-content-type-options"] == "nosniff"
    again = http.get("/", headers={"Accept": BROWSER_ACCEPT, "If-None-Match": page.headers["etag"]})
    assert again.status_code == 304


def test_the_page_has_a_strict_content_security_policy(http: httpx.Client) -> None:
    policy = http.get("/", headers={"Accept": BROWSER_ACCEPT}).headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"
    assert "unsafe" not in policy and "http" not in policy


def test_hashed_assets_are_immutable_and_the_page_loads_nothing_from_elsewhere(http: httpx.Client) -> None:
    page = http.get("/", headers={"Accept": BROWSER_ACCEPT}).text
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert references and all(ref.startswith("./static/") for ref in references), references
    kinds = {}
    for reference in references:
        asset = http.get(reference.removeprefix("."))
        assert asset.status_code == 200, reference
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert re.search(r"-[A-Za-z0-9_-]{8}\.\w+$", reference), f"{reference} has no content hash"
        kinds[reference.rsplit(".", 1)[1]] = asset.headers["content-type"]
    assert kinds["js"].startswith("text/javascript") and kinds["css"].startswith("text/css")
    script = next(ref for ref in references if ref.endswith(".js")).removeprefix(".")
    plain = http.get(script, headers={"Accept-Encoding": "identity"})
    zipped = http.get(script, headers={"Accept-Encoding": "gzip, br"})
    assert "content-encoding" not in plain.headers and zipped.headers["content-encoding"] == "gzip"
    assert zipped.content == plain.content and int(zipped.headers["content-length"]) < len(plain.content) / 2
    assert "Accept-Encoding" in zipped.headers["vary"]
    missing = http.get("/static/no-such-file.js")
    assert missing.status_code == 404 and missing.json()["error"] == "NOT_FOUND"
    assert http.get("/static/..%2Fplayground.py").status_code == 404


def test_config_and_balances_without_payments(http: httpx.Client) -> None:
    config = http.get("/playground/config").json()
    assert config["payments"]["enabled"] is False and config["testWallet"] is None
    assert config["limits"]["maxResults"] == 4 and config["limits"]["sideMultiple"] == 64
    balance = http.get("/playground/devchain/balance/0x70997970C51812dc3A010C7d01b50e0d17dc79C8")
    assert balance.status_code == 404 and balance.json()["error"] == "NOT_FOUND"


async def test_a_server_whose_page_was_not_built_says_so(tmp_path: Path) -> None:
    async def no_service() -> Any:
        raise AssertionError("the page is served without the service")

    app = create_app(no_service, cors_origins=[], max_body_bytes=1024, public_base_url=None,
                     playground_dir=tmp_path / "never-built")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert response.status_code == 503 and response.headers["content-type"].startswith("text/html")
    assert "The playground page is not built" in response.text and "./scripts/setup" in response.text
    assert response.headers["cache-control"] == "no-store"


def test_payments_switched_off_generate_for_free_with_progress(server: str, browser: Browser) -> None:
    opened = open_playground(browser, server)
    page = opened.page
    try:
        expect(page.get_by_role("note")).to_contain_text("Payments are switched off")
        expect(page.get_by_role("heading", name="Wallet")).to_have_count(0)
        page.get_by_label("Prompt", exact=True).fill("three green triangles in the night sky")
        page.get_by_label("Model", exact=True).select_option(label="Simulated GPU (benchmarks)")
        expect(page.locator("#price")).to_contain_text("Free: 1 image, 512 × 512, 4 steps")

        # The first render of a model here has no typical time yet: elapsed time alone.
        page.get_by_role("button", name="Generate (free)").click()
        expect(page.locator(".progress-text")).to_contain_text("no typical time yet")
        expect(page.get_by_role("progressbar", name="Generation progress")).to_be_visible()
        expect(page.locator(".gallery img")).to_have_count(1)
        expect(page.locator(".gallery .entry").first).to_contain_text("free")
        assert opened.generate_posts == [""]

        # Then it is measured against the model's recent render time on this server.
        page.get_by_role("button", name="Generate (free)").click()
        expect(page.locator(".progress-text")).to_contain_text(re.compile(r"of about [23] s"))
        expect(page.locator(".gallery img")).to_have_count(2)
        screenshot(page, "desktop-payments-off")
        assert serious_accessibility_violations(page) == []
        assert opened.problems == []
    finally:
        opened.close()

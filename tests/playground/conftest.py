"""One headless chromium per test module (Debian's, driven by Playwright), and the servers' settings."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from imagegate import devchain
from tests.playground.support import chromium_executable

# Generations and chain reads on a shared, loaded machine: wait for conditions generously.
expect.set_options(timeout=60_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox cannot start.
        launched = playwright.chromium.launch(executable_path=chromium_executable(), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def dev_chain_in_thread() -> Iterator[devchain.DevChain]:
    """A fresh anvil dev chain, run on its own event loop thread (the browser tests are synchronous)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dev-chain-loop", daemon=True)
    thread.start()
    chain = devchain.DevChain()
    try:
        asyncio.run_coroutine_threadsafe(chain.start(), loop).result(timeout=60)
        yield chain
    finally:
        asyncio.run_coroutine_threadsafe(chain.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

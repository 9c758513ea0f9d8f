from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from imagegate import devchain


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[devchain.DevChain]:
    """One dev chain per module: the chain every API process and the facilitator share."""
    async with devchain.DevChain() as running:
        yield running

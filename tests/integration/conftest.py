from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegate import devchain
from imagegate.app import app_from_settings
from imagegate.config import Settings, load_settings
from tests.support.server import live_server


def tiny_settings(root: Path, tiny_model_paths: dict[str, Path], **overrides: Any) -> Settings:
    """Embedded defaults on a temp data dir, the built-in ids pointed at tiny local pipelines."""
    # Imported here, not at the top: it pulls in diffusers and torch (~7 s), which modules that never
    # build tiny pipelines (test_paid_providers) should not wait for.
    from tests.support.models import tiny_catalog_overrides

    models = tiny_catalog_overrides(tiny_model_paths, root / "no-such-pipeline")
    models.update(overrides.pop("models", {}))
    return load_settings(
        data_dir=root,
        storage={"directory": str(root / "images")},
        diffusers={"cpu_threads": 1, "allow_downloads": False},
        models=models,
        catalog={"default_model": "flux-schnell"},
        **overrides,
    )


@pytest.fixture(scope="session")
def free_api(tmp_path_factory: pytest.TempPathFactory, tiny_model_paths: dict[str, Path]) -> Iterator[str]:
    """A real server with payments switched off: the core API on its own."""
    root = tmp_path_factory.mktemp("free-api")
    settings = tiny_settings(root, tiny_model_paths, payments={"enabled": False})
    with live_server(app_from_settings(settings)) as base_url:
        yield base_url


# --- paid servers on the dev chain (modules may define their own ``chain``, which then wins) -----


@pytest.fixture(scope="module")
async def chain() -> AsyncIterator[devchain.DevChain]:
    """A fresh anvil dev chain with the test USDC and a funded payer, for one test module."""
    async with devchain.DevChain() as running:
        yield running


def network_payments(root: Path, rpc_url: str, **facilitator: Any) -> dict[str, Any]:
    """A ``[payments]`` table: real x402 on "base-sepolia" (the dev chain at ``rpc_url``) to the dev
    chain's pay-to account, settled by the builtin facilitator with the dev facilitator key (written
    to ``root/facilitator.key``); ``facilitator`` overrides fields of ``[payments.facilitator]``."""
    key_file = root / "facilitator.key"
    key_file.write_text(devchain.FACILITATOR_ACCOUNT.private_key)
    return {
        "mode": "network",
        "options": [{"network": "base-sepolia", "pay_to": devchain.PAY_TO_ACCOUNT.address}],
        "facilitator": {"kind": "builtin", "rpc_url": rpc_url, "private_key_file": str(key_file), **facilitator},
        "reconcile_rpc_url": rpc_url,
    }

"""Read-only chain queries used to reconcile settlements whose outcome was not reported.

An EIP-3009 nonce is marked used on chain exactly when its transfer happened (or the payer
cancelled it), so ``authorizationState`` is the ground truth even when no transaction hash came back.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import httpx
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.crypto import keccak

AUTHORIZATION_USED_TOPIC = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()


class TransferState(StrEnum):
    SETTLED = "settled"
    FAILED = "failed"
    UNKNOWN = "unknown"


class ChainUnreachable(Exception):
    pass


class ChainReader:
    def __init__(self, rpc_url: str, *, timeout_s: float = 10.0):
        self.rpc_url = rpc_url
        self._http = httpx.AsyncClient(timeout=timeout_s, trust_env=False)
        self._request_id = 0

    async def _rpc(self, method: str, *params: Any) -> Any:
        self._request_id += 1
        try:
            response = await self._http.post(
                self.rpc_url, json={"jsonrpc": "2.0", "id": self._request_id, "method": method, "params": list(params)}
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise ChainUnreachable(f"RPC {self.rpc_url} {method} failed: {exc}") from exc
        body = response.json()
        if "error" in body:
            raise ChainUnreachable(f"RPC {method} error: {body['error']}")
        return body["result"]

    async def reachable(self) -> bool:
        try:
            await self._rpc("eth_blockNumber")
        except ChainUnreachable:
            return False
        return True

    async def transfer_state(
        self, asset: str, payer: str, nonce: str, tx_hash: str | None
    ) -> tuple[TransferState, str]:
        """Whether the authorization (payer, nonce) was transferred; returns the state and the tx hash."""
        if tx_hash:
            receipt = await self._rpc("eth_getTransactionReceipt", tx_hash)
            if receipt is not None:
                settled = int(receipt["status"], 16) == 1
                return (TransferState.SETTLED if settled else TransferState.FAILED), tx_hash
        selector = function_signature_to_4byte_selector("authorizationState(address,bytes32)")
        data = "0x" + (selector + abi_encode(["address", "bytes32"], [payer, bytes.fromhex(nonce[2:])])).hex()
        (used,) = abi_decode(["bool"], bytes.fromhex((await self._rpc("eth_call", {"to": asset, "data": data},
                                                                      "latest"))[2:]))
        if not used:
            # Not (yet) on chain: the broadcast may still be in a mempool until validBefore passes.
            return TransferState.UNKNOWN, tx_hash or ""
        logs = await self._rpc("eth_getLogs", {
            "address": asset,
            "fromBlock": "0x0",
            "toBlock": "latest",
            "topics": [AUTHORIZATION_USED_TOPIC, "0x" + abi_encode(["address"], [payer]).hex(), nonce],
        })
        if not logs:
            # Used without an AuthorizationUsed event: the payer cancelled it, no money moved.
            return TransferState.FAILED, tx_hash or ""
        return TransferState.SETTLED, str(logs[-1]["transactionHash"])

    async def balance_of(self, asset: str, owner: str) -> int:
        data = "0x" + (function_signature_to_4byte_selector("balanceOf(address)")
                       + abi_encode(["address"], [owner])).hex()
        (balance,) = abi_decode(["uint256"], bytes.fromhex((await self._rpc("eth_call", {"to": asset, "data": data},
                                                                            "latest"))[2:]))
        return int(balance)

    async def aclose(self) -> None:
        await self._http.aclose()

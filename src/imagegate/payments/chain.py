"""Read-only chain queries used to reconcile settlements whose outcome was not reported.

An EIP-3009 nonce is marked used on chain exactly when its transfer happened (or the payer
cancelled it), so ``authorizationState`` is the ground truth even when no transaction hash came back.
Which of the two happened, and in which transaction, is told by the token's ``AuthorizationUsed``
event. Public RPC endpoints refuse ``eth_getLogs`` over long block ranges
(Base's answer a few thousand blocks at most), so the events are looked up only where they can be:
from the first block after the authorization's ``validAfter`` (found by binary search on block
timestamps) to the last block before its ``validBefore``, in chunks of ``log_range`` blocks.
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
DEFAULT_LOG_RANGE = 1000


class TransferState(StrEnum):
    SETTLED = "settled"
    FAILED = "failed"
    UNKNOWN = "unknown"


class ChainUnreachable(Exception):
    pass


class ChainReader:
    """``log_range``: most blocks one ``eth_getLogs`` may span (``[payments] reconcile_log_range``)."""

    def __init__(self, rpc_url: str, *, timeout_s: float = 10.0, log_range: int = DEFAULT_LOG_RANGE):
        if log_range < 1:
            raise ValueError("log_range must be at least 1 block")
        self.rpc_url = rpc_url
        self.log_range = log_range
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
        self, asset: str, payer: str, nonce: str, tx_hash: str | None, *, valid_after: int = 0,
        valid_before: int | None = None,
    ) -> tuple[TransferState, str]:
        """Whether the authorization (payer, nonce) was transferred; returns the state and the tx hash.

        ``valid_after``/``valid_before``: the authorization's validity window (unix seconds), which
        bounds the blocks where its transfer can be.
        """
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
        transaction = await self._authorization_used_in(asset, payer, nonce, valid_after, valid_before)
        if transaction is None:
            # Used, but by no transfer in the only blocks where its transfer could be: the payer
            # cancelled it (AuthorizationCanceled), no money moved.
            return TransferState.FAILED, tx_hash or ""
        return TransferState.SETTLED, transaction

    async def _authorization_used_in(self, asset: str, payer: str, nonce: str, valid_after: int,
                                     valid_before: int | None) -> str | None:
        """The transaction that used (payer, nonce), from its AuthorizationUsed event, read in chunks."""
        latest = await self.block_number()
        # EIP-3009 transfers only while validAfter < block.timestamp < validBefore.
        first = await self.first_block_at(valid_after + 1, latest)
        last = latest
        if valid_before is not None and await self.block_timestamp(latest) >= valid_before:
            last = await self.first_block_at(valid_before, latest) - 1
        topics = [AUTHORIZATION_USED_TOPIC, "0x" + abi_encode(["address"], [payer]).hex(), nonce.lower()]
        for start in range(first, last + 1, self.log_range):
            end = min(start + self.log_range - 1, last)
            logs = await self._rpc("eth_getLogs", {"address": asset, "fromBlock": hex(start), "toBlock": hex(end),
                                                   "topics": topics})
            if logs:
                return str(logs[-1]["transactionHash"])
        return None

    async def block_number(self) -> int:
        return int(await self._rpc("eth_blockNumber"), 16)

    async def block_timestamp(self, number: int) -> int:
        block = await self._rpc("eth_getBlockByNumber", hex(number), False)
        if block is None:
            raise ChainUnreachable(f"RPC {self.rpc_url} has no block {number}")
        return int(block["timestamp"], 16)

    async def first_block_at(self, timestamp: int, latest: int) -> int:
        """The first block at or after ``timestamp`` (``latest + 1`` if none yet): binary search, since
        block timestamps never decrease; about log2(latest) requests."""
        low, high = 0, latest + 1
        while low < high:
            middle = (low + high) // 2
            if await self.block_timestamp(middle) >= timestamp:
                high = middle
            else:
                low = middle + 1
        return low

    async def balance_of(self, asset: str, owner: str) -> int:
        data = "0x" + (function_signature_to_4byte_selector("balanceOf(address)")
                       + abi_encode(["address"], [owner])).hex()
        (balance,) = abi_decode(["uint256"], bytes.fromhex((await self._rpc("eth_call", {"to": asset, "data": data},
                                                                            "latest"))[2:]))
        return int(balance)

    async def aclose(self) -> None:
        await self._http.aclose()

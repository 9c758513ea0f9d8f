"""Transactions from the facilitator's gas accounts: many in flight at once, each seen through to its block.

The x402 SDK's signer sends one transaction at a time per thread and waits for its receipt with
web3's fixed 100 ms polling steps. Here, per gas account, nonces are handed out locally (read once
from the node, then counted), so any number of settlements can be in the mempool together; with
several gas keys each new transaction goes to the account with the fewest in flight.

Confirmation costs at most one block:
- where the node offers ``eth_sendRawTransactionSync`` (EIP-7966: anvil, Base and other OP-stack
  nodes) the broadcast itself returns the receipt as soon as the block has it;
- otherwise (or when that call outlives ``sync_wait_s``) one watcher task per sender follows the
  chain head in step with the block time it observes (it sleeps until just before the next block
  is due, then polls briefly) and fetches every pending receipt in one batch request per block.

The watcher also repairs what a mempool can do to a transaction: one that disappears (dropped,
e.g. by ``anvil_dropTransaction`` or a node restart) is broadcast again; one stuck below the base
fee is replaced with higher fees (the same nonce); one whose nonce was taken by another
transaction is reported as ``TransactionReplaced`` so its owner can check what happened on chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import rlp  # type: ignore[import-untyped]  # (no type information shipped)
from coincurve import PrivateKey
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak

from imagegate.payments.rpc import JsonRpc, RpcError, RpcUnreachable

log = logging.getLogger(__name__)

# Unknown until two blocks have been seen; an instant (automine) chain keeps it at the floor.
DEFAULT_BLOCK_INTERVAL_S = 1.0
MIN_POLL_S = 0.01
MAX_POLL_S = 0.25
# Blocks without a receipt after which a transaction is looked for in the mempool again.
STALE_AFTER_BLOCKS = 3
# A transaction not seen mined for this long is checked even when no block came (a stalled chain).
STALE_AFTER_S = 5.0
# Fee bumps must raise both fee fields by at least 10% for a node to accept the replacement.
FEE_BUMP_NUMERATOR, FEE_BUMP_DENOMINATOR = 1125, 1000
# Gas prices are read at most this often (they change once a block at most).
FEE_CACHE_S = 1.0
NONCE_TAKEN_HINTS = ("nonce too low", "nonce has already been used", "already been used", "oldnonce",
                     "replacement transaction underpriced", "replacement underpriced")
FEE_TOO_LOW_HINTS = ("base fee", "fee too low", "feetoolow", "underpriced", "max fee per gas less")
ALREADY_KNOWN_HINTS = ("already known", "known transaction", "already imported", "alreadyknown")


class TransactionReplaced(Exception):
    """Another transaction took this one's nonce: it will never be mined (check the intended effect)."""


class TransactionRejected(Exception):
    """The node refused the transaction outright (not enough gas money, invalid); nothing was sent."""


@dataclass(frozen=True)
class Fees:
    max_fee: int
    priority_fee: int
    legacy: bool = False


@dataclass
class GasAccount:
    account: LocalAccount
    next_nonce: int | None = None
    in_flight: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    signing_key: PrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.signing_key = PrivateKey(bytes(self.account.key))

    @property
    def address(self) -> str:
        address: str = self.account.address
        return address


@dataclass
class Broadcast:
    """One nonce of one gas account, through all the signed versions sent for it."""

    gas_account: GasAccount
    nonce: int
    to: str
    data: str
    gas: int
    fees: Fees
    hashes: list[str]
    raw: str
    sent_at: float
    give_up_at: float
    done: asyncio.Future[dict[str, Any]]
    sent_block: int | None = None
    checked_at: float = 0.0
    watched: bool = False

    @property
    def latest_hash(self) -> str:
        return self.hashes[-1]


@dataclass(frozen=True)
class Sent:
    """A broadcast's outcome: its receipt, or only its hash when it did not confirm in time."""

    transaction: str
    receipt: dict[str, Any] | None


class TransactionSender:
    def __init__(self, rpc: JsonRpc, private_keys: Sequence[str], *, chain_id: int, gas_limit: int = 500_000,
                 sync_send: bool | None = None, sync_wait_s: float = 30.0):
        if not private_keys:
            raise ValueError("at least one gas key is needed to send transactions")
        self.rpc = rpc
        self.chain_id = chain_id
        self.gas_limit = gas_limit
        self.accounts = [GasAccount(Account.from_key(key)) for key in private_keys]
        # None: not known yet whether the node offers eth_sendRawTransactionSync (learned on first use).
        self.sync_send = sync_send
        self.sync_wait_s = sync_wait_s
        self._fees: Fees | None = None
        self._fees_at = 0.0
        self._fees_lock = asyncio.Lock()
        self._pending: dict[str, Broadcast] = {}  # by every hash it was sent under
        self._watcher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.block_interval_s: float | None = None
        self._last_block: int | None = None
        self._last_block_at = 0.0

    @property
    def addresses(self) -> list[str]:
        return [account.address for account in self.accounts]

    # 1. Sending

    async def send(self, to: str, data: str, *, deadline: float, give_up_at: float) -> Sent:
        """Broadcast a call to ``to`` and wait until ``deadline`` (monotonic) for its receipt.

        ``give_up_at`` (wall clock) is when the call can no longer succeed (e.g. the payment's
        ``validBefore``): the watcher stops repairing the transaction after it.
        Raises TransactionRejected (nothing sent), TransactionReplaced; RpcUnreachable only when the
        transaction was never handed to the node.
        """
        gas_account = min(self.accounts, key=lambda candidate: candidate.in_flight)
        gas_account.in_flight += 1
        try:
            broadcast = await self._broadcast_new(gas_account, to, data, give_up_at)
            return await self._confirm(broadcast, deadline)
        finally:
            gas_account.in_flight -= 1

    async def _broadcast_new(self, gas_account: GasAccount, to: str, data: str, give_up_at: float) -> Broadcast:
        for attempt in range(3):
            nonce = await self._take_nonce(gas_account)
            fees = await self.fees()
            raw, tx_hash = self._sign(gas_account, nonce, to, data, fees)
            broadcast = Broadcast(gas_account, nonce, to, data, self.gas_limit, fees, [tx_hash], raw,
                                  time.monotonic(), give_up_at, asyncio.get_running_loop().create_future())
            if self.sync_send is not False:
                # The receipt comes back with the broadcast (or the method turns out to be missing).
                return broadcast
            try:
                await self.rpc.call("eth_sendRawTransaction", raw)
            except RpcError as exc:
                if _hints(exc, ALREADY_KNOWN_HINTS):
                    return broadcast
                if _hints(exc, NONCE_TAKEN_HINTS) and attempt < 2:
                    await self._resync_nonce(gas_account)
                    continue
                await self._give_back_nonce(gas_account, nonce)
                raise TransactionRejected(f"the node refused the transaction: {exc.message}") from exc
            except RpcUnreachable:
                # The node may have it: watch for it (the watcher re-broadcasts what the node lacks).
                pass
            return broadcast
        raise AssertionError("unreachable")  # pragma: no cover

    async def _confirm(self, broadcast: Broadcast, deadline: float) -> Sent:
        if self.sync_send is not False:
            receipt = await self._send_sync(broadcast, deadline)
            if receipt is not None:
                return Sent(broadcast.latest_hash, receipt)
        self._watch(broadcast)
        try:
            receipt = await asyncio.wait_for(asyncio.shield(broadcast.done), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return Sent(broadcast.latest_hash, None)  # still watched until give_up_at
        return Sent(receipt["transactionHash"], receipt)

    async def _send_sync(self, broadcast: Broadcast, deadline: float) -> dict[str, Any] | None:
        """eth_sendRawTransactionSync: the receipt, or None when the watcher has to take over."""
        wait_s = max(0.5, min(self.sync_wait_s, deadline - time.monotonic()))
        try:
            receipt: dict[str, Any] | None = await self.rpc.call("eth_sendRawTransactionSync", broadcast.raw,
                                                                 timeout_s=wait_s + 1.0)
        except RpcError as exc:
            if exc.method_not_found and self.sync_send is None:
                log.info("RPC %s has no eth_sendRawTransactionSync: receipts are polled in step with blocks",
                         self.rpc.url)
                self.sync_send = False
                await self._resend(broadcast)
                return None
            if _hints(exc, ALREADY_KNOWN_HINTS) or "timeout" in exc.message.lower():
                return None  # in the mempool, not mined in time: watch it
            if _hints(exc, NONCE_TAKEN_HINTS):
                # Our count was behind (the key is used elsewhere too): sign again with a fresh nonce.
                await self._resync_nonce(broadcast.gas_account)
                await self._resign(broadcast, nonce=await self._take_nonce(broadcast.gas_account))
                return await self._send_sync(broadcast, deadline)
            await self._give_back_nonce(broadcast.gas_account, broadcast.nonce)
            raise TransactionRejected(f"the node refused the transaction: {exc.message}") from exc
        except RpcUnreachable:
            return None  # the node may have it: the watcher finds out, and re-broadcasts if not
        if self.sync_send is None:
            self.sync_send = True
        return receipt

    def _sign(self, gas_account: GasAccount, nonce: int, to: str, data: str, fees: Fees) -> tuple[str, str]:
        """The raw transaction and its hash."""
        if fees.legacy:
            legacy: dict[str, Any] = {"nonce": nonce, "to": to, "data": data, "value": 0, "gas": self.gas_limit,
                                      "chainId": self.chain_id, "gasPrice": fees.max_fee}
            signed = gas_account.account.sign_transaction(legacy)
            return "0x" + bytes(signed.raw_transaction).hex(), "0x" + bytes(signed.hash).hex()
        # EIP-1559 (type 2) by hand: eth-account's generic signer validates and re-encodes through
        # several layers and costs ~10x this (0.5-1 ms per transaction); the bytes are the same
        # (RFC 6979 signatures; checked against eth-account in the tests).
        fields: list[Any] = [self.chain_id, nonce, fees.priority_fee, fees.max_fee, self.gas_limit,
                             bytes.fromhex(to.removeprefix("0x")), 0, bytes.fromhex(data.removeprefix("0x")), []]
        signature = gas_account.signing_key.sign_recoverable(keccak(b"\x02" + rlp.encode(fields)), hasher=None)
        raw = b"\x02" + rlp.encode([*fields, signature[64], int.from_bytes(signature[:32], "big"),
                                    int.from_bytes(signature[32:64], "big")])
        return "0x" + raw.hex(), "0x" + keccak(raw).hex()

    async def _resign(self, broadcast: Broadcast, *, nonce: int | None = None, fees: Fees | None = None) -> None:
        if nonce is not None and nonce != broadcast.nonce:
            broadcast.nonce = nonce
            broadcast.hashes.clear()
        broadcast.fees = fees or broadcast.fees
        broadcast.raw, tx_hash = self._sign(broadcast.gas_account, broadcast.nonce, broadcast.to, broadcast.data,
                                            broadcast.fees)
        broadcast.hashes.append(tx_hash)
        if broadcast.watched:
            self._pending[tx_hash] = broadcast

    async def _resend(self, broadcast: Broadcast, *, repriced: bool = False) -> None:
        """Broadcast the latest signed version again (it is missing, or was never delivered)."""
        try:
            await self.rpc.call("eth_sendRawTransaction", broadcast.raw)
        except RpcError as exc:
            if _hints(exc, ALREADY_KNOWN_HINTS):
                return
            if _hints(exc, NONCE_TAKEN_HINTS):
                self._finish(broadcast, TransactionReplaced(
                    f"nonce {broadcast.nonce} of {broadcast.gas_account.address} was used by another transaction"))
                return
            if _hints(exc, FEE_TOO_LOW_HINTS) and not repriced:
                await self._reprice(broadcast, await self.fees(fresh=True))
                return
            log.warning("re-broadcast of %s refused: %s", broadcast.latest_hash, exc.message)
        except RpcUnreachable as exc:
            log.warning("re-broadcast of %s failed: %s", broadcast.latest_hash, exc)

    # 2. Nonces and fees

    async def _take_nonce(self, gas_account: GasAccount) -> int:
        if gas_account.next_nonce is None:
            async with gas_account.lock:
                if gas_account.next_nonce is None:
                    gas_account.next_nonce = int(await self.rpc.call(
                        "eth_getTransactionCount", gas_account.address, "pending"), 16)
        nonce = gas_account.next_nonce
        gas_account.next_nonce = nonce + 1
        return nonce

    async def _resync_nonce(self, gas_account: GasAccount) -> None:
        pending = int(await self.rpc.call("eth_getTransactionCount", gas_account.address, "pending"), 16)
        if gas_account.next_nonce is None or pending > gas_account.next_nonce:
            gas_account.next_nonce = pending

    async def _give_back_nonce(self, gas_account: GasAccount, nonce: int) -> None:
        """A nonce whose transaction the node refused: reuse it, or fill it so later ones can be mined."""
        if gas_account.next_nonce == nonce + 1:
            gas_account.next_nonce = nonce
            return
        # Later nonces are already out: a zero-value transfer to ourselves closes the gap.
        fees = await self.fees()
        filler = Broadcast(gas_account, nonce, gas_account.address, "0x", 21_000, fees, [], "", time.monotonic(),
                           time.time() + 600, asyncio.get_running_loop().create_future())
        raw, tx_hash = self._sign(gas_account, nonce, gas_account.address, "0x", fees)
        filler.raw, filler.hashes = raw, [tx_hash]
        log.warning("filling nonce gap %s of %s", nonce, gas_account.address)
        await self._resend(filler)
        self._watch(filler)

    async def fees(self, *, fresh: bool = False) -> Fees:
        """EIP-1559 fees from the latest block: twice its base fee plus the node's suggested tip."""
        if not fresh and self._fees is not None and time.monotonic() - self._fees_at < FEE_CACHE_S:
            return self._fees
        async with self._fees_lock:
            if not fresh and self._fees is not None and time.monotonic() - self._fees_at < FEE_CACHE_S:
                return self._fees
            block, tip = await self.rpc.batch([("eth_getBlockByNumber", ["latest", False]),
                                               ("eth_maxPriorityFeePerGas", [])])
            if isinstance(block, RpcError):
                raise RpcUnreachable(f"fees: {block}")
            base_fee = block.get("baseFeePerGas")
            if base_fee is None:  # a chain without EIP-1559
                price = await self.rpc.call("eth_gasPrice")
                self._fees = Fees(int(price, 16), 0, legacy=True)
            else:
                priority = 10**6 if isinstance(tip, RpcError) else int(tip, 16)
                self._fees = Fees(2 * int(base_fee, 16) + priority, priority)
            self._fees_at = time.monotonic()
            return self._fees

    # 3. Watching

    def _watch(self, broadcast: Broadcast) -> None:
        broadcast.watched = True
        for tx_hash in broadcast.hashes:
            self._pending[tx_hash] = broadcast
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_loop(), name="transaction-watcher")
        self._wake.set()

    def _finish(self, broadcast: Broadcast, outcome: dict[str, Any] | BaseException) -> None:
        for tx_hash in broadcast.hashes:
            self._pending.pop(tx_hash, None)
        if not broadcast.done.done():
            if isinstance(outcome, BaseException):
                broadcast.done.set_exception(outcome)
                broadcast.done.exception()  # retrieved: nobody may be waiting any more
            else:
                broadcast.done.set_result(outcome)

    def _poll_delay(self) -> float:
        interval = self.block_interval_s
        if interval is None:
            return MIN_POLL_S * 5
        step = min(MAX_POLL_S, max(MIN_POLL_S, interval / 20))
        # Sleep until just before the next block is due, then poll in small steps until it is there.
        due = self._last_block_at + interval * 0.9 - time.monotonic()
        return max(step, min(due, interval))

    async def _watch_loop(self) -> None:
        while self._pending:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_delay())
            try:
                await self._poll()
            except RpcUnreachable as exc:
                log.warning("transaction watcher: %s", exc)
                await asyncio.sleep(MAX_POLL_S)
            except Exception:
                log.exception("transaction watcher round failed")
                await asyncio.sleep(MAX_POLL_S)

    async def _poll(self) -> None:
        number = int(await self.rpc.call("eth_blockNumber"), 16)
        now = time.monotonic()
        new_block = self._last_block is None or number > self._last_block
        if new_block:
            if self._last_block is not None and number > self._last_block:
                observed = (now - self._last_block_at) / (number - self._last_block)
                self.block_interval_s = observed if self.block_interval_s is None else \
                    0.7 * self.block_interval_s + 0.3 * observed
            self._last_block, self._last_block_at = number, now
        broadcasts = {id(b): b for b in self._pending.values()}.values()
        for broadcast in broadcasts:
            if broadcast.sent_block is None:
                broadcast.sent_block = number
        if new_block:
            hashes = list(self._pending)
            receipts = await self.rpc.batch([("eth_getTransactionReceipt", [tx_hash]) for tx_hash in hashes])
            for tx_hash, receipt in zip(hashes, receipts, strict=True):
                mined = self._pending.get(tx_hash)
                if mined is not None and isinstance(receipt, dict):
                    self._finish(mined, receipt)
        for broadcast in list({id(b): b for b in self._pending.values()}.values()):
            await self._repair_if_stale(broadcast, number, now)

    async def _repair_if_stale(self, broadcast: Broadcast, block: int, now: float) -> None:
        if time.time() > broadcast.give_up_at:
            self._finish(broadcast, TransactionReplaced(
                f"{broadcast.latest_hash} was not mined before its call expired"))
            return
        blocks_waited = block - (broadcast.sent_block or block)
        if blocks_waited < STALE_AFTER_BLOCKS and now - broadcast.sent_at < STALE_AFTER_S:
            return
        if now - broadcast.checked_at < max(STALE_AFTER_S / 5, self.block_interval_s or 0):
            return
        broadcast.checked_at = now
        seen = await self.rpc.batch([("eth_getTransactionByHash", [tx_hash]) for tx_hash in broadcast.hashes])
        gone = not any(isinstance(found, dict) for found in seen)
        fees = await self.fees()
        if not fees.legacy and fees.max_fee > broadcast.fees.max_fee:
            log.warning("transaction %s (nonce %s) is priced below the base fee: sending it with higher fees",
                        broadcast.latest_hash, broadcast.nonce)
            await self._reprice(broadcast, fees)
        elif gone:
            log.warning("transaction %s (nonce %s) is gone from the mempool: broadcasting it again",
                        broadcast.latest_hash, broadcast.nonce)
            await self._resend(broadcast)

    async def _reprice(self, broadcast: Broadcast, fees: Fees) -> None:
        """The same nonce with fees that clear the current base fee, and at least +12.5% on both fee
        fields as nodes demand of a replacement: derived from the base fee now, not compounded from
        earlier bumps."""
        bumped = Fees(max(fees.max_fee, broadcast.fees.max_fee * FEE_BUMP_NUMERATOR // FEE_BUMP_DENOMINATOR + 1),
                      max(fees.priority_fee,
                          broadcast.fees.priority_fee * FEE_BUMP_NUMERATOR // FEE_BUMP_DENOMINATOR + 1),
                      fees.legacy)
        await self._resign(broadcast, fees=bumped)
        await self._resend(broadcast, repriced=True)

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher


def _hints(error: RpcError, hints: tuple[str, ...]) -> bool:
    text = f"{error.message} {error.data or ''}".lower().replace("_", " ")
    return any(hint in text for hint in hints)

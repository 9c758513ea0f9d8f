"""The embedded dev chain across crashes: a server SIGKILLed leaves its anvil running, and the next one
reattaches to that very anvil (nothing the chain accepted is lost); a clean stop ends it; a crashed
anvil restarts from the state it dumped a second ago. (The soak test checks the same over real
``imagegate serve`` restarts.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegate.devchain import PAY_TO_ACCOUNT, AnvilRecord, DevChain, _process_start_ticks
from tests.support.serve import eventually

OWNER = """
import asyncio, sys
from pathlib import Path
from imagegate.devchain import DevChain, PAY_TO_ACCOUNT

async def main():
    chain = DevChain(state_file=Path(sys.argv[1]))
    await chain.start()
    tx = await chain.mint(PAY_TO_ACCOUNT.address, 4242)
    print(chain.pid, tx, await chain.block_number(), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.fixture
def state_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "devchain" / "anvil-state.json"
    yield path
    # Whatever a failed test left running: ended by the pid it recorded.
    record = AnvilRecord.read(path.with_name(path.name + ".anvil.json"))
    if record is not None and record.alive():
        os.kill(record.pid, signal.SIGKILL)


def run_owner_then_kill_it(state_file: Path) -> tuple[int, str, int]:
    """A process that starts the chain, settles something on it and is SIGKILLed: (anvil pid, tx, block)."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(state_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid, transaction, block = owner.stdout.readline().split()
    finally:
        owner.kill()
        owner.wait(timeout=30)
    return int(pid), transaction, int(block)


async def test_a_killed_owner_leaves_the_chain_running_and_the_next_one_reattaches(state_file: Path) -> None:
    anvil_pid, transaction, block = await asyncio.to_thread(run_owner_then_kill_it, state_file)
    record = AnvilRecord.read(state_file.with_name(state_file.name + ".anvil.json"))
    assert record is not None and record.pid == anvil_pid and record.alive()

    chain = DevChain(state_file=state_file)
    await chain.start()
    try:
        assert chain.reattached and chain.pid == anvil_pid
        # Nothing it accepted is lost: the very same chain, settled transfer and all.
        assert await chain.block_number() >= block
        receipt = await chain.transaction_receipt(transaction)
        assert receipt is not None and int(receipt["status"], 16) == 1
        assert await chain.balance_of(PAY_TO_ACCOUNT.address) == 4242
    finally:
        await chain.stop()
    # A clean stop ends the chain (no orphan) after it wrote its state; the next start loads it.
    assert not record.alive()
    async with DevChain(state_file=state_file) as restarted:
        assert not restarted.reattached and restarted.pid != anvil_pid
        assert await restarted.balance_of(PAY_TO_ACCOUNT.address) == 4242
        assert await restarted.transaction_receipt(transaction) is not None


async def test_a_crashed_anvil_restarts_from_the_state_it_dumped_a_second_ago(state_file: Path) -> None:
    async with DevChain(state_file=state_file) as chain:
        transaction = await chain.mint(PAY_TO_ACCOUNT.address, 777)
        await asyncio.sleep(2.5)  # --state-interval 1: dumped since
        os.kill(chain.pid, signal.SIGKILL)

        async def gone() -> bool:
            return not chain.running

        assert await eventually(gone, 10)
        async with DevChain(state_file=state_file) as restarted:
            assert not restarted.reattached
            assert await restarted.balance_of(PAY_TO_ACCOUNT.address) == 777
            assert await restarted.transaction_receipt(transaction) is not None


async def test_a_record_that_is_not_our_running_anvil_is_never_reattached(state_file: Path) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    record_file = state_file.with_name(state_file.name + ".anvil.json")
    # A pid that is alive but whose start time differs (reused by another process since): not ours.
    AnvilRecord(os.getpid(), 1, 1, 84532).write(record_file)
    async with DevChain(state_file=state_file) as chain:
        assert not chain.reattached and chain.pid != os.getpid()
    # Our recorded anvil, alive but not answering as recorded (hung): ended, and a fresh one started.
    hung = await asyncio.create_subprocess_exec("sleep", "600")
    try:
        start_ticks = _process_start_ticks(hung.pid)
        assert start_ticks is not None
        AnvilRecord(hung.pid, start_ticks, 9, 84532).write(record_file)
        async with DevChain(state_file=state_file) as chain:
            assert not chain.reattached and chain.pid != hung.pid
        assert await asyncio.wait_for(hung.wait(), 30) == -signal.SIGTERM
    finally:
        if hung.returncode is None:
            hung.kill()
            await hung.wait()

"""End to end on loopback with every part real (issue 11, point 5): one PostgreSQL ledger, one bucket on
moto's S3 server, one dev chain and `imagegate facilitator`, the session's Ray head with 2 declared GPUs
whose worker app (2 replicas of imagegate-tiny on the CPU) is deployed by `imagegate workers deploy`, and
2 `imagegate serve` processes with engine = "ray" (``tests/shared_state/cluster.py``).

16 payers, each an x402 SDK client of its own in a task of its own, buy two generations each, one from
each API process, in two rounds:

1. while the first round renders, a worker replica is SIGKILLed mid-job: the API processes try its jobs
   again on the other replica and deliver them once;
2. in the second round, mining is paused; one API process is SIGKILLed mid-request, with one of its
   generations rendering and the transfer of another one waiting in the mempool, and restarted at once,
   as a supervisor would. Its clients lose their connections and resend the same payment, as it is, to
   whichever process answers: a lost answer, a 503 or a 202 SETTLEMENT_PENDING means "send this payment
   again", never "sign a new one". The client whose transfer is in flight is told 202 SETTLEMENT_PENDING
   until the chain confirms it (mining resumes then), and gets its images after.

At the end every paid request has its images, the same bytes through either API process and straight
from the bucket; the money agrees on chain, in the ledger and in the answers, per payer too; nothing was
settled without its images published, nothing rendered twice, no settlement reverted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from imagegate import devchain
from imagegate.config import load_settings
from imagegate.ledger import GenerationStatus, PaymentStatus, SqlLedger
from imagegate.payments.client import payer_address, payment_headers
from imagegate.workers.ray import app_handle, delete, read_app_status, replica_stats
from tests.shared_state.cluster import (
    MODEL,
    PAY_TO,
    PREFIX,
    Cluster,
    ClusterOptions,
    ImagegateProcess,
    running_cluster,
)
from tests.support.payments import mining_paused
from tests.support.postgres import PostgresServer
from tests.support.ray import KilledReplica, RayHead, kill_a_replica_mid_job, run_imagegate
from tests.support.s3 import MotoS3Server

APP = "imagegate-shared-e2e"
PAYERS = 16
ROUNDS = 2
FUNDS = 10 * 10**devchain.TOKEN_DECIMALS
# Small and quick on a CPU, yet long enough (a batch of up to 4 images per pipeline call) to be caught
# mid-job. Prices differ by round (steps) and by payer (images), so that the sums per payer tell apart.
WIDTH = HEIGHT = 128
STEPS_PER_ROUND = (12, 20)
# A client honours Retry-After (202, 503), up to this long: the dev chain confirms at once.
MAX_RESEND_PAUSE_S = 2.0
# After a lost connection a client tries the other API process after this pause.
RECONNECT_PAUSE_S = 0.25
# How long one purchase may take, resends included (a resend of a dead process's payment waits for
# reconciliation to release it: stale_after_s).
PURCHASE_TIMEOUT_S = 400.0


@pytest.fixture(scope="module")
async def cluster(ray_head: RayHead, postgres_server: PostgresServer, s3_server: MotoS3Server,
                  chain: devchain.DevChain, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    deployed: list[Cluster] = []

    async def deploy_workers(cluster: Cluster) -> None:
        # As an operator would: the API processes' own config file, before they start.
        done = await asyncio.to_thread(run_imagegate, "workers", "deploy", "--config", str(cluster.config_path(0)))
        assert done.returncode == 0, done.stdout + done.stderr
        deployed.append(cluster)

    options = ClusterOptions(
        api_processes=2,
        settings={"workers": {
            "engine": "ray", "address": ray_head.address, "app_name": APP, "replicas": 2, "gpus_per_replica": 1,
            "cpus_per_replica": 0, "batch_max_images": 4, "batch_wait_s": 0.2,
            "deployment_options": {"health_check_period_s": 1, "graceful_shutdown_timeout_s": 1}}},
        before_apis=deploy_workers)
    try:
        async with running_cluster(tmp_path_factory.mktemp("shared-e2e"), postgres_server, s3_server, chain,
                                   options) as running:
            yield running
    finally:
        for cluster in deployed:
            await asyncio.to_thread(delete, load_settings(cluster.config_path(0)))


# --- the paying clients ------------------------------------------------------------------------------------


@dataclass
class Purchase:
    """One paid request of one payer: one signed payment, sent as often as it takes."""

    payer: str
    body: dict[str, Any]
    price: int
    # The x402 SDK's payment (PAYMENT-SIGNATURE), signed once.
    headers: dict[str, str]
    # Every send of the payment: "api-1: 200", "api-0: RemoteProtocolError", "api-0: 202 SETTLEMENT_PENDING".
    sends: list[str] = field(default_factory=list)
    lost_answers: int = 0
    answer: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The ledger's key of this payment: network, payer, nonce."""
        signed = json.loads(base64.b64decode(self.headers["PAYMENT-SIGNATURE"]))
        authorization = signed["payload"]["authorization"]
        return f"{signed['accepted']['network']}:{authorization['from'].lower()}:{authorization['nonce'].lower()}"


class Clients:
    """The payers' side: one x402 SDK client per payer, the API processes in turn for failover. Which
    payment is being sent to which process right now (``sending``) lets a test kill a process mid-request."""

    def __init__(self, cluster: Cluster, http: httpx.AsyncClient):
        self.cluster = cluster
        self.http = http
        self.sending: dict[str, ImagegateProcess] = {}
        self.purchases: dict[str, Purchase] = {}

    async def buy(self, payer_key: str, body: dict[str, Any], first_api: int) -> Purchase:
        deadline = time.monotonic() + PURCHASE_TIMEOUT_S
        price = await self.cluster.price(body)  # the estimate, as a client checks before paying
        turn = first_api
        # The challenge: the unpaid request, to whichever process answers.
        while True:
            try:
                challenge = await self.http.post(self._url(turn), json=body)
                break
            except httpx.TransportError:
                turn += 1
                await asyncio.sleep(RECONNECT_PAUSE_S)
        assert challenge.status_code == 402, challenge.text
        purchase = Purchase(payer_address(payer_key), body, price,
                            await payment_headers(challenge, payer_key, max_atomic=price))
        self.purchases[purchase.key] = purchase
        # The payment, sent again as it is until the images come back.
        while time.monotonic() < deadline:
            api = self._api(turn)
            self.sending[purchase.key] = api
            try:
                response = await self.http.post(self._url(turn), json=body, headers=purchase.headers)
            except httpx.TransportError as exc:
                purchase.sends.append(f"{api.name}: {type(exc).__name__}")
                purchase.lost_answers += 1
                turn += 1  # the answer is lost: the same payment to the other process
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            finally:
                self.sending.pop(purchase.key, None)
            error = response.json().get("error") if response.status_code != 200 else None
            purchase.sends.append(f"{api.name}: {response.status_code} {error or ''}".rstrip())
            if response.status_code == 200:
                purchase.answer = response.json()
                return purchase
            if (response.status_code, error) == (202, "SETTLEMENT_PENDING") or response.status_code == 503:
                # Broadcast but not confirmed, or not served now: nothing to sign again, ask again.
                await asyncio.sleep(min(MAX_RESEND_PAUSE_S, float(response.headers.get("retry-after", 1))))
                continue
            raise AssertionError(f"{purchase.payer} paid and got {response.status_code} from {api.name}: "
                                 f"{response.text} (sends: {purchase.sends})")
        raise TimeoutError(f"{purchase.payer}: no images after {PURCHASE_TIMEOUT_S:.0f} s (sends: {purchase.sends})")

    def _api(self, turn: int) -> ImagegateProcess:
        return self.cluster.apis[turn % len(self.cluster.apis)]

    def _url(self, turn: int) -> str:
        return f"{self._api(turn).base_url}/v1/images/generate"


def request_body(payer: int, round_: int) -> dict[str, Any]:
    shapes = ["circles", "squares", "triangles", "stars"]
    return {"prompt": f"{payer % 3 + 1} red {shapes[payer % 4]} on a {'blue' if round_ else 'white'} background",
            "model": MODEL, "width": WIDTH, "height": HEIGHT, "steps": STEPS_PER_ROUND[round_],
            "numberResults": 1 + payer % 2, "seed": 100 * payer + round_}


# --- the faults ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KilledApi:
    # Payments sent to the dead process: one whose generation was rendering, one whose transfer was in the
    # mempool, and all of them.
    rendering: str
    settling: str
    held: list[str]


async def kill_an_api_mid_request(cluster: Cluster, victim: ImagegateProcess, clients: Clients) -> KilledApi:
    """SIGKILL ``victim`` once, as soon as one payment sent to it has its generation rendering and another
    one its transfer broadcast but not mined. Mining is paused (``mining_paused``): meanwhile this is the
    block producer, mining every transfer it does not hold (the facilitator sends them one at a time)."""
    async with cluster.ledger() as ledger:
        while True:
            held = [key for key, api in list(clients.sending.items()) if api is victim]
            mempool = await pending_calldata(cluster.chain)
            settling = [key for key in held if key.rsplit(":", 1)[1].removeprefix("0x") in mempool]
            rendering = [key for key in held if await generation_status(ledger, key) is GenerationStatus.RUNNING]
            if settling and rendering:
                victim.kill()
                return KilledApi(rendering[0], settling[0], held)
            if mempool:
                await cluster.chain.mine()
            await asyncio.sleep(0.05)


async def pending_calldata(chain: devchain.DevChain) -> str:
    """The calldata of every transaction waiting in the mempool, lowercase hex, joined."""
    pool = await chain.rpc("txpool_content")
    return " ".join(tx["input"].lower() for by_sender in pool["pending"].values() for tx in by_sender.values())


async def generation_status(ledger: SqlLedger, payment_key: str) -> GenerationStatus | None:
    payment = await ledger.payment(payment_key)
    if payment is None or payment.generation_id is None:
        return None
    generation = await ledger.generation(payment.generation_id)
    return generation.status if generation is not None else None


async def until(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not {what} after {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


# --- the test -----------------------------------------------------------------------------------------------


async def test_sixteen_payers_on_two_api_processes_survive_a_dead_replica_and_a_dead_api_process(
        cluster: Cluster) -> None:
    chain = cluster.chain
    payer_keys = await cluster.new_payers(PAYERS, FUNDS)
    start_block = await chain.block_number() + 1
    victim = cluster.apis[1]
    purchases: list[Purchase] = []
    async with httpx.AsyncClient(timeout=PURCHASE_TIMEOUT_S, trust_env=False) as http:
        clients = Clients(cluster, http)

        def round_of_purchases(round_: int) -> list[asyncio.Task[Purchase]]:
            # Payer i sends its first request to process i % 2 and its second to the other one.
            return [asyncio.create_task(clients.buy(key, request_body(index, round_), index + round_))
                    for index, key in enumerate(payer_keys)]

        # Round 1: a worker replica dies mid-job.
        done = asyncio.Event()
        replica_killer = asyncio.create_task(kill_a_replica_mid_job(APP, done))
        try:
            purchases += await asyncio.gather(*round_of_purchases(0))
        finally:
            done.set()
        killed_replica = await replica_killer
        assert killed_replica is not None, "no replica was seen rendering"

        # Round 2: an API process dies mid-request and is restarted; its clients resend their payments.
        second_round = asyncio.gather(*round_of_purchases(1))
        async with mining_paused(chain):
            async with asyncio.timeout(PURCHASE_TIMEOUT_S):
                killed_api = await kill_an_api_mid_request(cluster, victim, clients)
            # Restarted as a supervisor would, while its clients go to the other process.
            restart = asyncio.create_task(cluster.restart(victim))
            # The resend of the payment whose transfer is in flight: 202 once reconciliation finds the dead
            # process's settlement abandoned (stale_after_s) and the transfer not on chain yet.
            settling = clients.purchases[killed_api.settling]
            await until(lambda: f"{cluster.apis[0].name}: 202 SETTLEMENT_PENDING" in settling.sends,
                        "told SETTLEMENT_PENDING", cluster.options.stale_after_s + 60)
        await restart
        purchases += await second_round

        await cluster.wait_until_settled()
        books = await cluster.check_books()  # on chain == ledger == charged; 0 reverted; published once
        await check_every_purchase(cluster, http, purchases, payer_keys, start_block)

    # What happened, for the test's report (shown with -s, or when it fails).
    print(f"replica {killed_replica.replica.replica} killed rendering jobs {list(killed_replica.job_ids)}; "
          f"{victim.name} killed holding {len(killed_api.held)} paid requests "
          f"(rendering {killed_api.rendering}, settling {killed_api.settling})")
    for purchase in purchases:
        if len(purchase.sends) > 1:
            print(f"  {purchase.payer}: {' -> '.join(purchase.sends)}")
    check_the_replica_kill(cluster, killed_replica)
    await check_the_api_kill(cluster, victim, purchases, killed_api)
    # Everything the payers paid is the ledger's revenue bar the warm-up generations.
    warm_ups = [g for g in books.completed if g.payment_key not in {p.key for p in purchases}]
    assert books.ledger_revenue == sum(p.price for p in purchases) + sum(g.charged_amount for g in warm_ups)
    await check_nothing_rendered_twice(killed_replica)


async def check_every_purchase(cluster: Cluster, http: httpx.AsyncClient, purchases: list[Purchase],
                               payer_keys: list[str], start_block: int) -> None:
    assert len(purchases) == PAYERS * ROUNDS and all(p.answer for p in purchases)
    transfers = [t for t in await cluster.chain.token_transfers(from_block=start_block) if t.recipient == PAY_TO]
    async with cluster.ledger() as ledger:
        for payer in map(payer_address, payer_keys):
            bought = [p for p in purchases if p.payer == payer]
            paid = [t for t in transfers if t.sender == payer]
            # Per payer, three ways: on chain == the prices asked == what the answers say was charged.
            assert sorted(t.value for t in paid) == sorted(p.price for p in bought), (payer, paid, bought)
            assert sorted(int(p.answer["cost"]["amount"]) for p in bought) == sorted(p.price for p in bought)
            assert {t.transaction_hash for t in paid} == {p.answer["cost"]["transaction"] for p in bought}
            assert await cluster.chain.balance_of(payer) == FUNDS - sum(p.price for p in bought)
            for purchase in bought:
                # ... and the ledger: one settled payment, bound to the completed generation that answered.
                payment = await ledger.payment(purchase.key)
                assert payment is not None and payment.status is PaymentStatus.SETTLED, (purchase.sends, payment)
                assert payment.generation_id == purchase.answer["id"]
                assert payment.transaction == purchase.answer["cost"]["transaction"]
                generation = await ledger.generation(purchase.answer["id"])
                assert generation is not None and generation.status is GenerationStatus.COMPLETED
                assert generation.charged_amount == generation.price_amount == purchase.price

    # Every paid image: the same bytes through either API process and from the bucket (the CDN's origin).
    for purchase in purchases:
        assert len(purchase.answer["images"]) == purchase.body["numberResults"]
        for image in purchase.answer["images"]:
            stored = cluster.object_bytes(f"{PREFIX}images/{image['uuid']}.png")
            assert stored.startswith(b"\x89PNG")
            urls = [f"{api.base_url}/images/{image['uuid']}.png" for api in cluster.apis]
            for url in [*urls, f"{cluster.public_base_url}/{image['uuid']}.png", image["url"]]:
                response = await http.get(url)
                assert response.status_code == 200 and response.content == stored, (url, response.status_code)


def check_the_replica_kill(cluster: Cluster, killed: KilledReplica) -> None:
    """Each job the dead replica was rendering was tried again and delivered, once."""
    logs = "".join(api.log_tail(10**8) for api in cluster.apis)
    for job_id in killed.job_ids:
        # A job whose stream had not yet named its replica when it died is logged as such.
        replica = rf"({killed.replica.replica}|\(not yet known\))"
        assert re.search(rf"job {job_id} \({MODEL}\): its replica {replica} is gone", logs), job_id
        assert len(re.findall(rf"job {job_id} \({MODEL}\) delivered after \d+ tries", logs)) == 1, job_id


async def check_the_api_kill(cluster: Cluster, victim: ImagegateProcess, purchases: list[Purchase],
                             killed: KilledApi) -> None:
    """The clients cut off resent the same payment and got their images, charged once (the books above).
    The generation the dead process was rendering stays unfinished (or is failed by a survivor's
    reconciliation) and uncharged, and the resend rendered a new one; the one whose transfer it had
    broadcast was published by a survivor and replayed."""
    assert victim.starts == 2 and victim.running
    by_key = {purchase.key: purchase for purchase in purchases}
    for key in (killed.rendering, killed.settling):
        # Its answer was lost (RemoteProtocolError, ReadError: whichever the cut found), then it was served.
        sends = by_key[key].sends
        assert by_key[key].lost_answers == 1 and sends[0].startswith(f"{victim.name}: "), sends
        assert sends[-1].endswith(": 200"), sends
    rendering = by_key[killed.rendering]
    generations = await cluster.generations_paid_by(rendering.key)
    # The abandoned one is still running, or already failed by a survivor's reconciliation (its payment
    # bought the resend's generation): either way never charged and without images.
    [abandoned] = [g for g in generations if g.id != rendering.answer["id"]]
    assert sorted(g.status for g in generations if g is not abandoned) == [GenerationStatus.COMPLETED]
    assert abandoned.status in (GenerationStatus.RUNNING, GenerationStatus.FAILED), abandoned.status
    if abandoned.status is GenerationStatus.FAILED:
        # Released (the dead process's reservation, before the resend took it) or used again by the resend.
        assert abandoned.error in ("interrupted; its payment is released",
                                   "interrupted; its payment was used again for another request"), abandoned.error
    assert abandoned.charged_amount == 0 and abandoned.images == []
    settling = by_key[killed.settling]
    assert any(send.endswith(": 202 SETTLEMENT_PENDING") for send in settling.sends), settling.sends
    [generation] = await cluster.generations_paid_by(settling.key)
    assert generation.status is GenerationStatus.COMPLETED and generation.id == settling.answer["id"]


async def check_nothing_rendered_twice(killed: KilledReplica) -> None:
    """Once Serve has replaced the dead replica: each of its jobs was rendered to the end by one replica."""
    deadline = time.monotonic() + 180
    while (await asyncio.to_thread(read_app_status, APP)).running_replicas != 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        await asyncio.sleep(0.5)
    finished = [job for stats in await replica_stats(app_handle(APP), 2) for job in stats.recent_finished]
    assert all(finished.count(job_id) == 1 for job_id in killed.job_ids), (killed.job_ids, finished)

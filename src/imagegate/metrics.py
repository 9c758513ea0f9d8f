"""Prometheus metrics: every definition in one place, and small functions the flow calls.

The request flow never touches a metric object: it calls ``http_request``, ``payment``, ``revenue``...
Label children are looked up once and kept in dicts, so a call costs a dict lookup and an increment.

Several worker processes (``imagegate serve --workers N``) run in prometheus-client's multiprocess
mode: ``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is first imported (the CLI does it);
each process then writes its values to files there and ``render`` adds them up. Gauges say how they
combine across processes: queue depths and loaded models are summed over live processes, the
reconciliation backlog (every process sees the same ledger) is their maximum.

Money is counted in atomic units of the payment asset (USDC: 6 decimals, so one unit is $0.000001);
provider costs are recorded by the providers in micro-USD, the same unit for USDC.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from imagegate import __version__
from imagegate.workers.base import Engine

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Requests that matched no route share one label value: scanners must not grow the series count.
UNMATCHED_ROUTE = "unmatched"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 600)
SETTLEMENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
# Size buckets of generation latency: the side of a square image with the same pixel count.
SIZE_BUCKETS = (256, 512, 768, 1024, 1536, 2048)


# The *_created series double the output and no dashboard here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


HTTP_REQUESTS = Counter("imagegate_http_requests", "HTTP requests answered, by route template and status.",
                        ["method", "route", "status"])
HTTP_SECONDS = Histogram("imagegate_http_request_duration_seconds", "Time to answer an HTTP request.",
                         ["method", "route"], buckets=HTTP_BUCKETS)
PAYMENTS = Counter(
    "imagegate_payments",
    "Payment outcomes: challenged (402 without payment), verified, settled, failed (by reason), pending, "
    "replayed, released, unavailable, reconciled (by reason: settled or failed).",
    ["outcome", "reason"])
REVENUE = Counter("imagegate_revenue_atomic", "Money settled for delivered generations, in atomic units.",
                  ["model", "network", "asset"])
PROVIDER_COST = Counter("imagegate_provider_cost_atomic",
                        "What hosted providers charged for delivered generations, in atomic units (micro-USD).",
                        ["model", "network", "asset"])
GENERATIONS = Counter("imagegate_generations", "Generations by how they ended.", ["model", "outcome"])
GENERATION_SECONDS = Histogram(
    "imagegate_generation_seconds", "Render time (queueing included), by model and size bucket "
    "(side of a square image with as many pixels, rounded up).", ["model", "size"], buckets=GENERATION_BUCKETS)
QUEUE_DEPTH = Gauge("imagegate_queue_depth", "Renders admitted and not finished (waiting or running), by model.",
                    ["model"], multiprocess_mode="livesum")
BUSY_REFUSALS = Counter("imagegate_busy_refusals", "Requests refused with 503 MODEL_BUSY (before payment).",
                        ["model"])
SETTLEMENT_SECONDS = Histogram("imagegate_settlement_seconds", "Time to settle a payment, by outcome.",
                               ["network", "outcome"], buckets=SETTLEMENT_BUCKETS)
RECONCILIATION_BACKLOG = Gauge(
    "imagegate_reconciliation_backlog",
    "Work waiting for reconciliation: payments whose settlement outcome is unknown (payment_pending) and "
    "generations waiting for that outcome (generation_pending).", ["state"], multiprocess_mode="livemax")
MODEL_LOADED = Gauge("imagegate_model_loaded", "Processes holding the model in memory.", ["model"],
                     multiprocess_mode="livesum")
MODEL_MEMORY = Gauge("imagegate_model_memory_bytes", "Memory held by the model's weights.", ["model"],
                     multiprocess_mode="livesum")
RATE_LIMITED = Counter("imagegate_rate_limited", "Requests refused with 429 RATE_LIMITED, by route class.",
                       ["route_class"])
BUILD_INFO = Gauge("imagegate_build_info", "The running imagegate version.", ["version"],
                   multiprocess_mode="livemax")

_http_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
_payment_children: dict[tuple[str, str], Counter] = {}
_queue_children: dict[str, Gauge] = {}
_reported_loaded: set[str] = set()


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    key = (method, route, status)
    children = _http_children.get(key)
    if children is None:
        label_method = method if method in KNOWN_METHODS else "OTHER"
        children = _http_children[key] = (HTTP_REQUESTS.labels(label_method, route, str(status)),
                                           HTTP_SECONDS.labels(label_method, route))
    children[0].inc()
    children[1].observe(seconds)


def payment(outcome: str, reason: str = "") -> None:
    key = (outcome, reason)
    child = _payment_children.get(key)
    if child is None:
        child = _payment_children[key] = PAYMENTS.labels(outcome, _bounded_reason(reason))
    child.inc()


_REASON = re.compile(r"^[a-z0-9_]{1,64}$")


def _bounded_reason(reason: str) -> str:
    # Reasons come from our code and the SDK's ERR_* constants; a facilitator's free text is not a label.
    return reason if not reason or _REASON.match(reason) else "other"


def revenue(model: str, network: str, asset: str, amount: int, provider_cost: int | None) -> None:
    """A generation was delivered and its payment settled."""
    if amount:
        REVENUE.labels(model, network, asset.lower()).inc(amount)
    if provider_cost:
        PROVIDER_COST.labels(model, network, asset.lower()).inc(provider_cost)


def generation_finished(model: str, outcome: str) -> None:
    GENERATIONS.labels(model, outcome).inc()


def size_bucket(width: int, height: int) -> str:
    side = (width * height) ** 0.5
    return str(next((bucket for bucket in SIZE_BUCKETS if side <= bucket), SIZE_BUCKETS[-1]))


def generation_rendered(model: str, width: int, height: int, seconds: float) -> None:
    GENERATION_SECONDS.labels(model, size_bucket(width, height)).observe(seconds)


def busy_refusal(model: str) -> None:
    BUSY_REFUSALS.labels(model).inc()


def settlement(network: str, outcome: str, seconds: float) -> None:
    SETTLEMENT_SECONDS.labels(network, outcome).observe(seconds)


def reconciliation_backlog(payments_pending: int, generations_pending: int) -> None:
    RECONCILIATION_BACKLOG.labels("payment_pending").set(payments_pending)
    RECONCILIATION_BACKLOG.labels("generation_pending").set(generations_pending)


def rate_limited(route_class: str) -> None:
    RATE_LIMITED.labels(route_class).inc()


def refresh_engine(engine: Engine, model_ids: Iterable[str]) -> None:
    """Queue depth of every catalog model (idle ones 0) and what is loaded, from this process's engine."""
    model_ids = list(model_ids)
    for model_id in model_ids:
        child = _queue_children.get(model_id)
        if child is None:
            child = _queue_children[model_id] = QUEUE_DEPTH.labels(model_id)
        child.set(engine.queue_depth(model_id))
    loaded = engine.loaded_models()
    for model_id in {*model_ids, *_reported_loaded, *loaded}:
        MODEL_LOADED.labels(model_id).set(1 if model_id in loaded else 0)
        MODEL_MEMORY.labels(model_id).set(loaded.get(model_id, 0))
    _reported_loaded.update(loaded)


def started() -> None:
    BUILD_INFO.labels(__version__).set(1)


def stopped() -> None:
    """This process stops serving: its live gauges leave the sums."""
    directory = multiprocess_dir()
    if directory is not None:
        prometheus_multiprocess.mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]


def reset_multiprocess_dir(directory: str) -> None:
    """Values of an earlier run must not be added to this one's (prometheus-client's rule)."""
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def render() -> bytes:
    """The exposition text: this process's registry, or every worker's values in multiprocess mode.

    Reads files in multiprocess mode: call it off the event loop.
    """
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY)
    # A worker that died without stopping (SIGKILL) leaves its live gauges behind: drop them here.
    for name in os.listdir(directory):
        match = _LIVE_FILE.match(name)
        if match and not _alive(int(match.group(1))):
            prometheus_multiprocess.mark_process_dead(int(match.group(1)), directory)  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

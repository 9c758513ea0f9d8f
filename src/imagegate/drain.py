"""Graceful drain: stop taking new paid work, finish what is paid, cut what cannot finish in time.

The guard belongs to the service, so that every entry point that takes paid work (the synchronous
route, asynchronous jobs, an OpenAI-compatible route) goes through the same one:

    async with drain.paid_work():          # 503 SERVER_DRAINING once draining, before any payment step
        ...reserve and verify the payment...
        async with drain.interruptible():  # what the end of the grace period cuts: rendering
            result = await engine.render(...)
        ...settle, publish...              # never cut: a settlement cut halfway has an unknown outcome

``Drain.run`` is what SIGTERM starts (``imagegate serve``): new paid work is refused from then on;
paid work in flight gets ``timeout_s`` in all to finish and settle; what still renders after that is
cancelled where it runs (at its next denoising step) and answered 503 SERVER_DRAINING, its payment
released by the request flow, so the client's resend of the same payment works after a restart.
``run`` returns when no paid work is left (or, for work that will not let go, a little later).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from imagegate.errors import ServerDraining

log = logging.getLogger(__name__)

# What Retry-After adds to the grace left: roughly how long the server takes to come back up.
RESTART_ESTIMATE_S = 10
# After the cut, how long cancelled work gets to answer its client and give its payment back (it ends
# at its next step), and a settlement already under way gets to finish, before the server goes anyway.
AFTER_CUT_WAIT_S = 15.0


class Drain:
    def __init__(self, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self._draining = False
        self._cut = False
        self._deadline: float | None = None  # event-loop time at which the grace ends
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # The cancel scopes of work that may be cut, each armed when the grace ends.
        self._scopes: set[asyncio.Timeout] = set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        """Paid requests (or jobs) between their payment step and their answer, in this process."""
        return self._in_flight

    def retry_after(self) -> int:
        """Seconds after which a client is likely to find the server back (restarted)."""
        left = 0.0
        if self._deadline is not None:
            left = max(0.0, self._deadline - asyncio.get_running_loop().time())
        return math.ceil(left) + RESTART_ESTIMATE_S

    def refuse_if_draining(self) -> None:
        if self._draining:
            raise ServerDraining(
                "The server is shutting down and takes no new paid work; nothing was asked or charged. "
                "Retry shortly (this server once restarted, or another one).",
                retry_after=self.retry_after(),
            )

    @asynccontextmanager
    async def paid_work(self) -> AsyncIterator[None]:
        """Count this work as paid work in flight; refused (503 SERVER_DRAINING) once draining."""
        self.refuse_if_draining()
        async with self.tracked():
            yield

    @asynccontextmanager
    async def tracked(self) -> AsyncIterator[None]:
        """Count work already paid for (an accepted job's delivery) as paid work in flight, never refused:
        the drain waits for it like for a synchronous request."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    @asynccontextmanager
    async def interruptible(self) -> AsyncIterator[None]:
        """Work the end of the grace period may cancel; it then raises ``ServerDraining``."""
        if self._cut:
            raise self._cut_error()
        scope = asyncio.timeout(None)
        try:
            async with scope:
                self._scopes.add(scope)
                try:
                    yield
                finally:
                    self._scopes.discard(scope)
        except TimeoutError as exc:
            if scope.expired():
                raise self._cut_error() from exc
            raise

    async def run(self) -> None:
        """Drain: refuse new paid work, wait for paid work in flight, cut it when the grace is over."""
        loop = asyncio.get_running_loop()
        self._draining = True
        self._deadline = loop.time() + self.timeout_s
        log.warning("draining: no new paid work; %d paid request(s) in flight get %.0f s to finish",
                    self._in_flight, self.timeout_s)
        try:
            await asyncio.wait_for(self._idle.wait(), self.timeout_s)
            log.warning("drained: all paid work finished")
            return
        except TimeoutError:
            pass
        self._cut = True
        log.warning("drain grace over: cancelling %d render(s); their payments are released, not settled",
                    len(self._scopes))
        for scope in list(self._scopes):
            scope.reschedule(loop.time())  # expires now: the render is cancelled where it runs
        try:
            await asyncio.wait_for(self._idle.wait(), AFTER_CUT_WAIT_S)
        except TimeoutError:
            log.error("%d paid request(s) still in flight after the drain; stopping anyway", self._in_flight)

    def _cut_error(self) -> ServerDraining:
        return ServerDraining(
            "The server is shutting down and could not finish your generation in time; it was cancelled and "
            "nothing was charged. Send the same request with the same payment again shortly.",
            retry_after=self.retry_after(),
        )

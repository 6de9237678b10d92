"""The sandbox gateway, the receiver and the worker's Resources on real ports, for the tests
that drive ``workers.sender`` end to end (test_worker, test_client, and through test_worker
test_reports and test_vault).

A helper module rather than conftest fixtures: each test module wraps the running stack in
its own shape (test_worker a tuple that other modules unpack, test_client a richer object).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from refunds import db as dbmod
from refundctl.onboarding import onboard, record_paid, tell_of_store
from refundctl.processes import free_port
from refunds.settings import get_settings
from tests.helpers import paid

CLIENT_TIMEOUT = 1.0  # the worker client's timeout in these tests; the sandbox holds lost answers longer


def process_refund(res, refund_id):
    """``workers.sender.process_refund``, imported late: importing workers sets up the broker."""
    from workers.sender import process_refund as process

    return process(res, refund_id)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free loopback port; returns its runner (to clean up) and its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def chaos(http: aiohttp.ClientSession, sandbox_url: str, **knobs) -> None:
    """Set the sandbox's fault knobs (POST /sandbox/chaos)."""
    async with http.post(f"{sandbox_url}/sandbox/chaos", json=knobs) as response:
        assert response.status == 200, await response.text()


class FirstDrawsHit(random.Random):
    """A sandbox ``Chaos.rng`` whose first ``hits`` draws hit any rate above zero and every later one
    misses: faults that are certainly met, and certainly fewer than a caller's tries."""

    def __init__(self, hits: int):
        super().__init__(0)
        self.hits = hits

    def random(self) -> float:
        if self.hits > 0:
            self.hits -= 1
            return 0.0
        return 1.0 - 1e-9


@dataclass(frozen=True)
class RunningStack:
    res: object  # workers.resources.Resources, whose client talks to the sandbox
    sandbox_url: str
    sandbox_app: web.Application
    http: aiohttp.ClientSession  # a plain session for the tests' own calls to the sandbox
    receiver_url: str

    def first_draws_hit(self, hits: int) -> FirstDrawsHit:
        """The sandbox's next ``hits`` random draws hit (a fault for each rate set above zero), no later one."""
        from pagoefectivo.sandbox.app import SANDBOX

        rng = self.sandbox_app[SANDBOX].chaos.rng = FirstDrawsHit(hits)
        return rng

    async def onboard(self, merchant) -> None:
        """Register ``merchant`` (ours, with its keys) with the sandbox gateway, as its seller would."""
        await onboard(self.http, self.sandbox_url, merchant, self.res.vault, receiver_url=self.receiver_url)

    def onboarded(self, make_merchant):
        """``make_merchant`` (conftest) that also onboards each merchant it makes with the gateway."""
        async def make(*args, **kwargs):
            keys = await make_merchant(*args, **kwargs)
            if keys.merchant.env == "sandbox":  # a sandbox gateway knows no production merchant
                await self.onboard(keys.merchant)
            return keys
        return make

    async def paid(self, db, merchant: str = "m1", transaction: str = "CIP-1", amount: str = "100.00", *,
                   currency: str = "PEN", method: str = "cash", days_ago: float = 0):
        """A payment both parties know: the gateway's record of it and ours (what its cip.paid records)."""
        payment = await paid(db, merchant, transaction, amount, currency=currency, method=method, days_ago=days_ago)
        await record_paid(self.http, self.sandbox_url, merchant_id=merchant, transaction_id=transaction,
                          amount=payment.amount, currency=currency, method=method, paid_at=payment.paid_at)
        return payment


@contextlib.asynccontextmanager
async def start_stack(database_url, redis_url, vault, monkeypatch, *,
                      trace_configs: Sequence[aiohttp.TraceConfig] = ()) -> AsyncIterator[RunningStack]:
    """Sandbox + receiver on real ports, and worker Resources pointing at them (Redis flushed).
    The merchants and payments already in our store are told to the sandbox; later ones through
    ``RunningStack.onboard`` / ``onboarded`` / ``paid``.

    ``trace_configs`` go on the worker client's session, to observe what it sends.
    """
    from pagoefectivo.sandbox import create_app as sandbox_app
    from receiver import create_app as receiver_app
    from refunds.ratelimit import RateLimiter
    from workers.resources import Resources, gateway_client

    receiver_runner, receiver_url = await serve(receiver_app(database_url=database_url, vault=vault))
    app = sandbox_app()
    sandbox_runner, sandbox_url = await serve(app)
    monkeypatch.setenv("REFUNDS_NOTIFY_URL", receiver_url)
    monkeypatch.setenv("PAGOEFECTIVO_BASE_URL", sandbox_url)
    get_settings.cache_clear()
    settings = get_settings()
    pool = await dbmod.create_pool(database_url, max_size=5)
    session = aiohttp.ClientSession(trace_configs=list(trace_configs))
    client = gateway_client(session, settings, timeout=CLIENT_TIMEOUT)  # as the workers make it
    redis_client = aioredis.from_url(redis_url)
    await redis_client.flushdb()
    res = Resources(settings, pool, session, client, vault, redis_client, RateLimiter(redis_client))
    http = aiohttp.ClientSession()
    running = RunningStack(res, sandbox_url, app, http, receiver_url)
    try:
        await tell_of_store(database_url, vault, sandbox_url, receiver_url=receiver_url)
        yield running
    finally:
        await http.close()
        await res.close()
        await sandbox_runner.cleanup()
        await receiver_runner.cleanup()
        get_settings.cache_clear()

"""Webhooks with real processes: the Procfile's services, a calling service's endpoint that
fails, times out and recovers, and the worker killed with SIGKILL mid-run. Every event is
delivered at least once, each with a stable id, and each signature verifies."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import standardwebhooks
from aiohttp import web

from tests.helpers import ROOT
from tests.stack import serve
from tests.system.test_chaos import enqueue_all, seed, system, wait_all_final  # noqa: F401  (system: the fixture)

pytestmark = pytest.mark.chaos


class Endpoint:
    """Fails its first seconds from the first request (500s and answers too slow, however long the
    services took to start), then answers 204; keeps what it got."""

    def __init__(self, failing_for: float) -> None:
        self.failing_for = failing_for
        self.until: float | None = None
        self.received: dict[str, list[bytes]] = defaultdict(list)  # webhook-id -> bodies
        self.headers: dict[str, dict] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received[request.headers["webhook-id"]].append(body)
        self.headers[request.headers["webhook-id"]] = dict(request.headers)
        if self.until is None:
            self.until = time.monotonic() + self.failing_for
        if time.monotonic() < self.until:
            if random.random() < 0.3:
                await asyncio.sleep(15)  # over WEBHOOK_TIMEOUT_SECONDS: a timeout
            return web.Response(status=500)
        return web.Response(status=204)


def refundctl(env: dict, *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "refundctl", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout


async def test_every_event_reaches_a_failing_then_recovering_endpoint_across_a_worker_kill(
        db, make_merchant, database_url, system):
    endpoint = Endpoint(failing_for=6)
    app = web.Application()
    app.router.add_post("/hooks", endpoint.handle)
    runner, url = await serve(app)
    system.env.update({"WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32", "WEBHOOK_TIMEOUT_SECONDS": "2",
                       "WEBHOOK_LEASE_SECONDS": "5"})
    try:
        requests = await seed(db, make_merchant, {"m1": 50}, 60)
        added = json.loads(refundctl(system.env, "webhooks", "add", "--name", "checkout", "--url", f"{url}/hooks",
                                     "--merchant", "m1", "--json"))
        await asyncio.to_thread(system.start, "--sync-status-mix", '{"success": 2, "pending": 1}')
        await enqueue_all(database_url, requests)
        await asyncio.sleep(2)
        system.kill_worker()  # SIGKILL, mid-run: messages and leases it held are lost with it
        await asyncio.to_thread(system.start_worker)
        await wait_all_final(db, len(requests), timeout=90)

        deadline = time.monotonic() + 90
        while await db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state <> 'delivered'"):
            assert time.monotonic() < deadline, await db.fetch(
                "SELECT state, attempts, last_error FROM webhook_deliveries WHERE state <> 'delivered' LIMIT 5")
            await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()

    event_ids = {row["event_id"] for row in await db.fetch("SELECT event_id FROM webhook_events")}
    # accepted + pending (a third of them) + a final state, per refund
    assert len(event_ids) >= 2 * len(requests)
    assert event_ids <= set(endpoint.received)  # every event delivered at least once
    verifier = standardwebhooks.Webhook(added["secret"])
    for event_id in event_ids:
        bodies = endpoint.received[event_id]
        assert len(set(bodies)) == 1  # a redelivery is the same event, byte for byte
        event = verifier.verify(bodies[0], endpoint.headers[event_id])
        assert event["id"] == event_id and event["data"]["merchant_id"] == "m1"
    retried = await db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE attempts > 1")
    assert retried > 0  # the endpoint's failures were retried, not lost

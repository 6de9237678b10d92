"""refundctl sandbox onboard and payment import: the real command against a real sandbox
gateway on a port and a real Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime, timezone
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web

from pagoefectivo import protocol
from pagoefectivo.sandbox import create_app
from pagoefectivo.sandbox.chaos import ChaosConfig
from refundctl.processes import free_port
from refunds.payments import find_payment
from tests.helpers import ROOT, paid
from tests.stack import serve


async def refundctl(database_url: str, *args: str, **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "refundctl", *args, cwd=ROOT, env={**os.environ, "DATABASE_URL": database_url, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_onboard_registers_the_merchant_so_that_it_can_authorize(db, database_url, merchant_maker):
    keys = await merchant_maker("seller-1")
    await merchant_maker("prod-1", env="production")
    runner, url = await serve(create_app())
    try:
        code, out, err = await refundctl(database_url, "sandbox", "onboard", "seller-1", "--json", "--sandbox-url", url,
                                         "--receiver-url", "https://refunds.example.test")
        assert code == 0, err
        registered = json.loads(out)
        assert registered["notifyUrl"] == "https://refunds.example.test/pagoefectivo/notifications/seller-1"
        assert "secretKey" not in registered and keys.secret_key not in out + err
        merchant, date_request = keys.merchant, protocol.lima_timestamp(datetime.now(timezone.utc))
        body = {"accessKey": merchant.access_key, "idService": merchant.service_id, "dateRequest": date_request,
                "hashString": protocol.auth_hash(merchant.service_id, merchant.access_key, keys.secret_key,
                                                 date_request)}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/authorizations", data=protocol.dumps(body),
                                 headers={"Content-Type": "application/json"}) as response:
                assert response.status == 201
        code, _, err = await refundctl(database_url, "sandbox", "onboard", "prod-1", "--sandbox-url", url)
        assert code == 2 and "sandbox merchants only" in err and err.count("\n") == 1
    finally:
        await runner.cleanup()
    code, _, err = await refundctl(database_url, "sandbox", "onboard", "seller-1",
                                   "--sandbox-url", f"http://127.0.0.1:{free_port()}")
    assert code == 3 and "unreachable" in err and err.count("\n") == 1


class NotTheSandbox:
    """A host at --sandbox-url that is not the sandbox gateway: an HTML 404 on every route, as a web
    server or PagoEfectivo's own host answers a route it does not have; or, once ``knobs`` is set, the
    sandbox's answer to GET /sandbox/chaos and a proxy's empty 502 to the rest. Keeps every request."""

    def __init__(self):
        self.seen: list[tuple[str, str, bytes]] = []
        self.knobs: dict | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.answer)
        return app

    async def answer(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, await request.read()))
        if self.knobs is not None:
            if (request.method, request.path) == ("GET", "/sandbox/chaos"):
                return web.json_response(self.knobs)
            return web.Response(status=502)
        return web.Response(status=404, content_type="text/html",
                            text="<html><body><h1>404 Not Found</h1></body></html>")


@pytest.mark.slow
async def test_onboard_with_a_host_that_is_not_the_sandbox_is_one_line_and_sends_no_secret(db, database_url,
                                                                                          merchant_maker):
    keys = await merchant_maker("seller-1")
    host = NotTheSandbox()
    runner, url = await serve(host.app())
    try:
        code, out, err = await refundctl(database_url, "sandbox", "onboard", "seller-1", "--sandbox-url", url)
        assert code == 2 and out == "" and "Traceback" not in err and err.count("\n") == 1, err
        assert f"{url}/sandbox/chaos answered HTTP 404 (text/html" in err and "not a sandbox gateway" in err
        assert [(method, path) for method, path, _ in host.seen] == [("GET", "/sandbox/chaos")]  # no PUT
        assert all(keys.secret_key.encode() not in body for _, _, body in host.seen)

        host.knobs, host.seen = ChaosConfig().to_json(), []  # a sandbox that a proxy cannot reach on PUT
        code, out, err = await refundctl(database_url, "sandbox", "onboard", "seller-1", "--sandbox-url", url)
        assert code == 3 and out == "" and "Traceback" not in err and err.count("\n") == 1, err
        assert f"{url}/sandbox/merchants/seller-1 answered HTTP 502" in err
    finally:
        await runner.cleanup()


@pytest.mark.slow
async def test_payment_import_finds_then_fills_what_never_came(db, database_url, merchant_maker, tmp_path):
    await merchant_maker("seller-1")
    await paid(db, "seller-1", "2900001", "100.00")
    path = tmp_path / "paid.csv"
    path.write_text("merchant_id,transaction_id,amount,currency,paid_at\n"
                    "seller-1,2900001,100.00,PEN,2026-11-20T10:00:00-05:00\n"
                    "seller-1,2900002,80.00,PEN,2026-11-20T11:00:00-05:00\n")
    code, out, err = await refundctl(database_url, "payment", "import", str(path), "--dry-run", "--json")
    assert code == 1, err
    report = json.loads(out)
    assert report["counts"] == {"missing": 1, "recorded": 0, "known": 1, "conflict": 0}
    assert await find_payment(db, "seller-1", "2900002") is None
    code, out, err = await refundctl(database_url, "payment", "import", str(path))
    assert code == 0, err
    assert "2900002" in out and "1 recorded" in out
    assert (await find_payment(db, "seller-1", "2900002")).amount == Decimal("80.00")
    code, out, _ = await refundctl(database_url, "payment", "import", str(path), "--dry-run")
    assert code == 0 and "2 known" in out
    path.write_text("merchant_id,transaction_id,amount,currency\nseller-1,2900003,8.001,PEN\n")
    code, _, err = await refundctl(database_url, "payment", "import", str(path))
    assert code == 2 and "line 2: amount 8.001 has more than 2 decimals" in err and err.count("\n") == 1

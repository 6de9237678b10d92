"""/openapi.json is a valid OpenAPI 3 document, and the live intake API keeps to it.

schemathesis generates requests from the document (schema examples, boundary values,
random valid and invalid data) against the real app on a real port, with a real token,
and checks every answer: no 5xx, only documented status codes, and bodies, headers and
content types as documented. The data the document's examples name (merchant
``seller-1``, payment ``2900123``) exist, so the accepted (202) and replay (200) answers
are exercised too, not only refusals.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from openapi_spec_validator import validate

from producers.http import create_app, openapi_document
from refunds.payments import record_payment
from refundctl.processes import free_port
from refunds.tokens import create_token

REDIS_DB = 14  # module_redis_url: deliveries of the refunds the fuzzer gets accepted stay here
CHECKS = ",".join((
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
    "missing_required_header", "unsupported_method", "ignored_auth",
))




@pytest_asyncio.fixture
async def live_intake(db, make_merchant, database_url, module_redis_url):
    """The intake app on a free port, with the document's example merchant, payment and a token for it."""
    await make_merchant("seller-1", approval_threshold=Decimal("500.00"))
    await record_payment(db, merchant_id="seller-1", transaction_id="2900123", amount=Decimal("100000.00"),
                         currency="PEN", method="cash", paid_at=datetime.now(timezone.utc))
    token = await create_token(db, "fuzzer", ["seller-1"])
    runner = web.AppRunner(create_app(database_url=database_url, redis_url=module_redis_url))
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", token
    finally:
        await runner.cleanup()


def test_the_document_is_valid_openapi():
    validate(openapi_document())


async def test_the_served_document_is_valid_and_lists_every_answer(live_intake):
    base, _ = live_intake
    async with aiohttp.ClientSession() as http, http.get(f"{base}/openapi.json") as response:
        assert response.status == 200
        document = json.loads(await response.text())
    validate(document)
    post = document["paths"]["/v1/refunds"]["post"]["responses"]
    assert set(post) == {"200", "202", "400", "401", "403", "408", "409", "413", "422", "503", "500"}
    assert {"200", "400", "401", "404", "503"} <= set(document["paths"]["/v1/refunds/{refund_id}"]["get"]["responses"])
    assert {"200", "400", "401", "403", "404", "503"} <= set(document["paths"]["/v1/refunds"]["get"]["responses"])
    for decision in ("approve", "reject"):
        responses = document["paths"][f"/v1/refunds/{{refund_id}}/{decision}"]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "403", "404", "408", "409", "413", "422", "503", "500"}
    for operation in [op for path in document["paths"].values() for op in path.values()]:
        for status, response in operation["responses"].items():
            if status >= "400" and "content" in response:
                schema = response["content"]["application/json"]["schema"]["$ref"]
                assert schema in ("#/components/schemas/Error", "#/components/schemas/NotReady"), (status, schema)


@pytest.mark.timeout(120)
@pytest.mark.slow
async def test_schemathesis_finds_nothing_the_document_does_not_allow(db, live_intake, tmp_path):
    base, token = live_intake
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{base}/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", CHECKS,
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "40",
        "--max-time", "30",  # the whole run; fuzzing and stateful repeat until it is spent
        "--seed", "20261125",
        "--workers", "2",
        "--request-timeout", "10",
        "--suppress-health-check", "all",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 110)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "No issues found" in text or " passed" in text, text[-3000:]
    # the positive paths ran: the example refund was accepted and then replayed
    assert await db.fetchval("SELECT count(*) FROM refunds WHERE merchant_id = 'seller-1'") >= 1

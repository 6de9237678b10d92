"""A Python client generated from the served OpenAPI document (openapi-python-client) works against
a live intake: create, replay, conflict, read, list and an error, every answer parsed into its
model, unexpected statuses raised, and each model written out again equal to the body."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from producers.http import create_app
from tests.helpers import paid
from tests.producers.test_intake import bearer
from tests.stack import serve

REDIS_DB = 2  # module_redis_url: a Redis database of our own
BIN = Path(sys.executable).parent
PACKAGE = "intake_client"


@pytest_asyncio.fixture
async def intake(db, database_url, module_redis_url):
    runner, url = await serve(create_app(database_url=database_url))
    try:
        yield url
    finally:
        await runner.cleanup()


async def generated(url: str, folder: Path):
    """The client package generated from the document ``url`` serves, imported."""
    if not (BIN / "openapi-python-client").exists():
        pytest.fail("openapi-python-client is not installed: pip install -e '.[test]'", pytrace=False)
    async with aiohttp.ClientSession() as http, http.get(f"{url}/openapi.json") as response:
        (folder / "openapi.json").write_text(json.dumps(await response.json()))
    done = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--path", "openapi.json", "--meta", "none",
         "--output-path", PACKAGE], cwd=folder, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})  # its ruff post-hooks
    assert done.returncode == 0 and "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))


def read_back(answer) -> dict:
    """The parsed answer written out again: equal to the body only when every field was modelled
    (the generated models drop fields the document does not declare) and read as sent."""
    return answer.parsed.to_dict()


async def test_a_generated_python_client_reads_every_answer(db, make_merchant, intake, tmp_path):
    pkg = await generated(intake, tmp_path)
    api = importlib.import_module(f"{PACKAGE}.api.refunds")
    models = importlib.import_module(f"{PACKAGE}.models")
    for name in ("create_refund", "get_refund", "list_refunds"):
        importlib.import_module(f"{PACKAGE}.api.refunds.{name}")
    await make_merchant("m1")
    await paid(db)
    token = (await bearer(db))["Authorization"].removeprefix("Bearer ")
    client = pkg.AuthenticatedClient(base_url=intake, token=token, raise_on_unexpected_status=True)

    def request(**changes):
        fields = dict(merchant_id="m1", original_transaction_id="CIP-1", amount="10.00",
                      currency=models.RefundRequestCurrency.PEN, external_ref="R-1", reason="damaged")
        return models.RefundRequest(**{**fields, **changes})

    async with client:
        created = await api.create_refund.asyncio_detailed(client=client, body=request())
        assert created.status_code == 202 and isinstance(created.parsed, models.Accepted)
        refund_id = created.parsed.refund_id

        replay = await api.create_refund.asyncio_detailed(client=client, body=request())
        assert replay.status_code == 200 and replay.parsed == created.parsed
        assert replay.headers["Idempotent-Replayed"] == "true"

        conflict = await api.create_refund.asyncio_detailed(client=client, body=request(amount="20.00"))
        assert conflict.status_code == 409 and isinstance(conflict.parsed, models.Error)
        assert conflict.parsed.error.request_id == conflict.headers["X-Request-Id"]

        read = await api.get_refund.asyncio_detailed(refund_id, client=client)
        assert read.status_code == 200 and isinstance(read.parsed, models.RefundWithEvents)
        assert read.parsed.refund_id == refund_id and read.parsed.events[0].from_state is None

        await api.create_refund.asyncio_detailed(client=client, body=request(external_ref="R-2", amount="1.00"))
        first = await api.list_refunds.asyncio_detailed(client=client, merchant_id="m1", limit=1)
        assert first.status_code == 200 and isinstance(first.parsed, models.RefundList)
        assert [r.external_ref for r in first.parsed.refunds] == ["R-1"] and first.parsed.next_cursor
        rest = await api.list_refunds.asyncio_detailed(client=client, merchant_id="m1", after=first.parsed.next_cursor)
        assert [r.external_ref for r in rest.parsed.refunds] == ["R-2"] and rest.parsed.next_cursor is None
        one = await api.list_refunds.asyncio_detailed(client=client, merchant_id="m1", external_ref="R-2")
        assert isinstance(one.parsed, models.RefundWithEvents) and one.parsed.external_ref == "R-2"

        refused = await api.create_refund.asyncio_detailed(client=client, body=request(external_ref="R-3",
                                                                                       amount="10.001"))
        assert refused.status_code == 422 and refused.parsed.error.field == "amount"

        for answer in (created, replay, conflict, read, first, rest, one, refused):
            assert read_back(answer) == json.loads(answer.content)

    anonymous = pkg.Client(base_url=intake, raise_on_unexpected_status=True)
    async with anonymous:
        denied = await api.get_refund.asyncio_detailed(refund_id, client=anonymous)
    assert denied.status_code == 401 and isinstance(denied.parsed, models.Error)
